"""Meta's reference (the `llama-models` package, test-only) run on tiny Meta-format checkpoints,
float32 on the CPU at model-parallel size 1 (the caller provides the size-1 group): greedy
tokens and logprobs, and the Llama 3 chat formatter's prompt ids, to compare ours against.

Files cut for several ranks are read by llama-models' own loader, which reshards them to this
one process. That loader knows Llama 3's cut only (it joins tok_embeddings by the vocabulary),
so a Llama 2 checkpoint's reference reads the same weights written as one file: llama-models'
Transformer with Llama 2's rope (theta 10000, no scaling) is the computation of Meta's Llama 2
reference, whose package is not published."""
from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llama.checkpoints.make_tiny import make_tiny
from tests.tokenizer_files import llama3_tokenizer_model

LLAMA31 = {"rope_theta": 500000.0, "use_scaled_rope": True}  # params.json keys of Llama 3.1


def make_tiny_llama3(out: Path, shards: int, seed: int = 7, n_heads: int = 4, n_kv_heads: int = 2) -> Path:
    """A tiny Llama 3.1-format checkpoint: GQA, scaled rope, the real tokenizer, random weights,
    cut into `shards` files as Meta cuts Llama 3 (the embedding by its vocabulary). Its attention
    is sharp (wq, wk of std 1), so positions matter: without the rope scaling its logprobs differ
    by more than 1e-3 within 30 tokens (with Meta's 0.02, by under 1e-5). 8 heads and 4 KV
    heads let it run at model-parallel size 4."""
    return make_tiny(out, shards=shards, dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, multiple_of=32,
                     ffn_dim_multiplier=1.3, seed=seed, explicit_vocab=True, tokenizer_model=llama3_tokenizer_model(),
                     extra_params=LLAMA31, qk_std=1.0)


@contextmanager
def _without_torchvision() -> Iterator[None]:
    """llama-models' generation module imports its vision model, whose image transforms import
    torchvision at load time; the text model never calls them, and torchvision's CPU build is
    not on PyPI. Stand-in modules let the import through, and are gone after it: left in
    sys.modules, they would make later find_spec("torchvision") calls fail (datasets makes one)."""
    stand_ins: dict[str, types.ModuleType] = {}
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        stand_ins = {"torchvision": tv, "torchvision.transforms": tv.transforms,
                     "torchvision.transforms.functional": tv.transforms.functional}
        sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def reference_greedy(ckpt_dir: Path, prompts: list[list[int]], max_gen_len: int,
                     max_seq_len: int = 128) -> list[tuple[list[int], list[float]]]:
    """Each prompt's first max_gen_len greedy tokens (fewer if a stop token came) and their
    logprobs, from llama-models' Llama3.generate on the checkpoint: its files read by llama-models'
    loader (every file of a Llama 3 checkpoint; a Llama 2 one must be one file, see above)."""
    with _without_torchvision():
        from llama_models.checkpoint import maybe_reshard_state_dict
        from llama_models.llama3.args import ModelArgs as RefArgs
        from llama_models.llama3.chat_format import LLMInput
        from llama_models.llama3.generation import Llama3
        from llama_models.llama3.model import Transformer as RefTransformer
        from llama_models.llama3.tokenizer import Tokenizer as RefTokenizer

    params = json.loads((ckpt_dir / "params.json").read_text())
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    llama3 = "rope_theta" in params  # Meta's Llama 2 params.json has none: its rope's theta is 10000
    if not llama3:
        assert len(paths) == 1, "llama-models' loader joins files as Llama 3's are cut: give Llama 2's as one file"
        params["rope_theta"] = 10000.0
    tokenizer = RefTokenizer(ckpt_dir / "tokenizer.model") if llama3 else _SentencePieceStops(ckpt_dir / "tokenizer.model")
    if params.get("vocab_size", -1) == -1:  # Meta's Llama 2 reference: the tokenizer decides
        params["vocab_size"] = tokenizer.n_words
    args = RefArgs(**params, max_batch_size=len(prompts), max_seq_len=max_seq_len)
    dtype = torch.get_default_dtype()
    try:
        with warnings.catch_warnings():  # it sets bf16 as the default type, the deprecated way
            warnings.simplefilter("ignore", UserWarning)
            state = maybe_reshard_state_dict(paths, n_kv_heads=args.n_kv_heads)
        state = {k: v.float() for k, v in state.items() if k != "rope.freqs"}
    finally:
        torch.set_default_dtype(dtype)
    model = RefTransformer(args).float()
    model.load_state_dict(state)
    generator = Llama3(model, tokenizer, args)
    out: list[tuple[list[int], list[float]]] = [([], []) for _ in prompts]
    done = [False] * len(prompts)
    inputs = [LLMInput(tokens=p) for p in prompts]
    for results in generator.generate(inputs, temperature=0, max_gen_len=max_gen_len, logprobs=True):
        for r in results:
            i = r.batch_idx
            if r.source != "output" or r.ignore_token or done[i]:
                continue
            if r.token in tokenizer.stop_tokens or len(out[i][0]) == max_gen_len:
                done[i] = True
                continue
            out[i][0].append(r.token)
            out[i][1].append(r.logprobs[0])
    return out


class _SentencePieceStops:
    """What Llama3.generate asks of its tokenizer (pad id, stop tokens, decode), from Llama 2's
    sentencepiece file: Meta's Llama 2 pads with -1 and stops at EOS."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.n_words = self._sp.vocab_size()
        self.pad_id = self._sp.pad_id()
        self.stop_tokens = [self._sp.eos_id()]
        self.special_tokens = {"<|image|>": -2}  # looked up by Llama3's chat formatter, never met in text

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


META_PROMPTS = ["The capital of France is", "Hello, world! <|eot_id|> stays text here", "日本語のテキスト 🦙 " * 3]
META_DIALOG = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a llama."}]
META_MAX_GEN = 12


def meta_files_reference(meta_files: dict[tuple[int, int], Path], version: int
                         ) -> tuple[list[list[int]], list[tuple[list[int], list[float]]]]:
    """For tests/conftest.py's meta_files of `version`: META_PROMPTS and META_DIALOG's chat prompt
    as ids, and the reference's greedy answers (META_MAX_GEN tokens). Llama 3's reference reads
    the 4 files through llama-models' loader; Llama 2's reads the same weights as one file."""
    from llama.checkpoints.load import inspect_checkpoint
    from llama.tokenizers.chat_format import encode_dialog

    tok = inspect_checkpoint(meta_files[version, 1]).tokenizer()
    if version == 3:
        chat = reference_chat_ids(meta_files[3, 1] / "tokenizer.model", META_DIALOG)
    else:  # Llama 2's formatter is checked against Meta's golden chat (tests/unit/test_golden.py)
        chat = encode_dialog(tok, META_DIALOG)
    prompts = [tok.encode(p, bos=True, eos=False) for p in META_PROMPTS] + [chat]
    return prompts, reference_greedy(meta_files[version, 4 if version == 3 else 1], prompts, META_MAX_GEN)


def reference_chat_ids(tokenizer_model: Path, dialog: list[dict]) -> list[int]:
    """The prompt ids Meta's ChatFormat makes for a text-only dialog, ready for the assistant."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as RefTokenizer

    formatter = ChatFormat(RefTokenizer(Path(tokenizer_model)))
    return formatter.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in dialog]).tokens
