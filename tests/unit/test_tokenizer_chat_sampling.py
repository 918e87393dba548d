"""Tokenizer ids, the Llama-2 chat format as token lists, sampling, and backend choice."""
from __future__ import annotations

import pytest
import torch

from llama.chat_format import UNSAFE_ERROR, encode_dialog, has_special_tags
from llama.distributed import BackendUnavailableError, choose_backend, resolve_device, resolve_dtype
from llama.sampling import sample, sample_rows, sample_top_p
from llama.tokenizer import Tokenizer
from tests.conftest import GOLDEN_CKPT


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(GOLDEN_CKPT / "tokenizer.model")


def test_meta_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, -1, 400)
    assert tok.encode("hello", bos=True, eos=False) == [1, 285]
    assert tok.encode("hello", bos=True, eos=True) == [1, 285, 2]
    assert tok.decode([285]) == "hello"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_chat_single_user(tok):
    d = [{"role": "user", "content": " hi "}]
    assert encode_dialog(tok, d) == tok.encode("[INST] hi [/INST]", bos=True, eos=False)


def test_chat_system_and_turns(tok):
    d = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "and now?"},
    ]
    want = tok.encode("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST] hello! ", bos=True, eos=True)
    want += tok.encode("[INST] and now? [/INST]", bos=True, eos=False)
    assert encode_dialog(tok, d) == want


@pytest.mark.parametrize(
    "roles",
    [[], ["assistant"], ["user", "user"], ["system"], ["user", "assistant"], ["system", "assistant", "user"]],
)
def test_chat_role_order_is_checked(tok, roles):
    with pytest.raises(ValueError, match="role"):
        encode_dialog(tok, [{"role": r, "content": "x"} for r in roles])


def test_special_tags(tok):
    assert has_special_tags([{"role": "user", "content": "tell me about [INST] tags"}])
    assert not has_special_tags([{"role": "user", "content": "tell me about tags"}])
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."


def test_greedy_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert sample(logits, 0.0, 0.9).tolist() == [1, 0]
    # top_p so small that only the most likely token survives: sampling becomes greedy
    probs = torch.softmax(logits, dim=-1)
    for _ in range(20):
        assert sample_top_p(probs, 0.01).reshape(-1).tolist() == [1, 0]


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {int(sample_top_p(probs.clone(), 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 are dropped


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]  # noqa: E731
    together = sample_rows(logits, [1.0] * 4, [1.0] * 4, gens())
    alone = [int(sample_rows(logits[i : i + 1], [1.0], [1.0], [gens()[i]])[0]) for i in range(4)]
    assert together.tolist() == alone


def test_no_nccl_on_a_cpu_machine_is_a_clear_error():
    cpu = torch.device("cpu")
    assert choose_backend(cpu) == "gloo"
    with pytest.raises(BackendUnavailableError, match="nccl.*(no NCCL|needs CUDA)"):
        choose_backend(cpu, "nccl")


def test_device_and_dtype_resolution():
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int8", torch.device("cpu"))
