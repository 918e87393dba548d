"""Checkpoints: Meta's layout (Llama 2 and 3.x, any number of files) and Hugging Face folders,
validated once per start (load.inspect_checkpoint) and read as one rank's slices under Meta's
names, resharded N -> M; a rank's load progress; the maker of tiny checkpoints in Meta's layout.

May import llama.model.args (the shapes a config implies), llama.model.stages (which layers a
pipeline stage holds) and llama.tokenizers (a checkpoint's
tokenizer is checked against its vocabulary); nothing of llama.engine.
"""
