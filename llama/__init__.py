"""Llama model, tokenizer, checkpoint loading and generation: everything inside one rank, in
four packages (model, checkpoints, tokenizers, engine; each __init__ says what it may import),
with Meta's reference API (reference_api) and the process-group set-up (distributed) on top.

No Ray here, no environment variables, and no process group of its own except the one-process
group `Llama.build` starts for plain scripts.
"""
from llama.model.args import ModelArgs
from llama.model.transformer import Transformer
from llama.reference_api import Llama
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.chat_format import Dialog, Message

__all__ = ["Llama", "ModelArgs", "Transformer", "Tokenizer", "Dialog", "Message"]
