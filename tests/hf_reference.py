"""Hugging Face-format test checkpoints with their tokenizers, and what transformers (test-only)
answers on them: greedy tokens with each token's logprob, and a chat's prompt ids."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import GOLDEN_CKPT
from tests.hf_tiny import make_tiny_hf
from tests.tokenizer_files import OFFICIAL, write_hf_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # short, so the scaling shows on short prompts
# name -> (tokenizer, make_tiny_hf options): tokenizer.json as Llama 3's Hub folders have it, or
# a sentencepiece tokenizer.model alone, as openlm-research/open_llama_3b ships.
CASES = {
    "llama3-sharded-gqa": ("llama3", {"max_shard_size": "2MB"}),
    "llama3-rope-tied": ("llama3", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "open_llama-sentencepiece": ("sentencepiece", {"num_key_value_heads": 4}),
}


def make_hf_checkpoint(out: Path, case: str, chat_template: str | None = OFFICIAL) -> Path:
    """The case's folder: weights and config by transformers, its tokenizer files (with
    `chat_template`: write_hf_tokenizer's), and config's and generation_config's bos/eos ids set
    to the tokenizer's (as real folders have them)."""
    kind, options = CASES[case]
    if kind == "sentencepiece":
        (out / "tokenizer.model").parent.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.model").write_bytes((GOLDEN_CKPT / "tokenizer.model").read_bytes())
        tok_path = out / "tokenizer.model"
    else:
        tok_path = write_hf_tokenizer(out, kind, chat_template)
    from llama.tokenizers.load import load_tokenizer

    tok = load_tokenizer(tok_path)
    make_tiny_hf(out, vocab_size=tok.n_words, **options)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((out / name).read_text())
        config.update(bos_token_id=tok.bos_id, eos_token_id=sorted(tok.stop_ids) if name != "config.json" else tok.eos_id)
        (out / name).write_text(json.dumps(config))
    return out


def transformers_greedy(ckpt: Path, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy tokens (ending before an end token) and their logprobs, one prompt
    at a time, from transformers' LlamaForCausalLM.generate in float32."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    stops = set(json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"])
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = torch.tensor([p])  # the mask given: else an id equal to pad_token_id would be masked
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        new = g.sequences[0, len(p):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(g.logits, new)]
        cut = next((k for k, t in enumerate(new) if t in stops), len(new))
        out.append((new[:cut], logprobs[:cut]))
    return out


def transformers_chat_ids(ckpt: Path, dialog: list[dict]) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return list(tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=False))
