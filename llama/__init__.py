"""Llama model, tokenizer, checkpoint loading and generation: everything inside one rank.

No Ray here, no environment variables, and no process group of its own except the one-process
group `Llama.build` starts for plain scripts.
"""
from llama.args import ModelArgs
from llama.chat_format import Dialog, Message
from llama.reference_api import Llama
from llama.model import Transformer
from llama.tokenizer import Tokenizer

__all__ = ["Llama", "ModelArgs", "Transformer", "Tokenizer", "Dialog", "Message"]
