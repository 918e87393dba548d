"""The model: the Transformer on fairscale's parallel layers (one rank's shard), its shape from
params.json (ModelArgs), its KV cache and the packed batch a step hands it.

May import torch and fairscale only: nothing of llama.engine, llama.checkpoints or
llama.tokenizers (the engine is above the model, never the other way).
"""
