"""The engine: continuous batching on one rank's model. What a request asks and returns
(request), sampling, the scheduler and each sequence's state, the step plan and its wire form,
the runner that runs a plan on the shard (the static decode in CUDA graphs), and Engine's step
loop with its settings (config).

May import llama.model and llama.tokenizers; nothing of llama.checkpoints (a model arrives
loaded).
"""
