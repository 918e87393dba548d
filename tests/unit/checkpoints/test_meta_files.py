"""Meta's checkpoints cut for several ranks, as Meta cuts each version: Llama 2's embedding by its
width (ParallelEmbedding), Llama 3's by its vocabulary (VocabParallelEmbedding). The maker writes
each version's cut; the loader reads the cut from the files and reshards N -> M from either;
a cut of neither kind, files cut differently and quantized files are refused by name; and at
model-parallel size 1 the engine gives Meta's reference tokens on 2- and 4-file checkpoints
(sizes 2 and 4: tests/unit/test_torchrun.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llama.checkpoints.errors import CheckpointError
from llama.checkpoints.load import inspect_checkpoint, load_rank_state
from tests.conftest import GOLDEN_CKPT, rank_slice
from tests.meta_reference import META_MAX_GEN

pytest.importorskip("llama_models")

EMBED = "tok_embeddings.weight"


def _file(ckpt: Path, i: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / f"consolidated.{i:02d}.pth", weights_only=True)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("n", [2, 4])
def test_the_maker_cuts_each_version_as_meta_does(meta_files, version, n):
    """Read from the files themselves, not through the loader: a maker that wrote one version
    with the other's embedding cut fails here."""
    args = inspect_checkpoint(meta_files[version, 1]).args
    v, d = args.vocab_size, args.dim
    for i in range(n):
        sd = _file(meta_files[version, n], i)
        assert tuple(sd[EMBED].shape) == ((v, d // n) if version == 2 else (v // n, d))
        assert torch.equal(sd[EMBED], _file(meta_files[version, 1])[EMBED].chunk(n, dim=1 if version == 2 else 0)[i])
        assert tuple(sd["output.weight"].shape) == (v // n, d)  # ColumnParallelLinear in both
        assert tuple(sd["layers.0.attention.wo.weight"].shape) == (d, args.n_heads * args.head_dim // n)


@pytest.mark.parametrize("version,dim", [(2, 1), (3, 0)])
def test_the_loader_reads_the_cut_from_the_files(meta_files, version, dim):
    assert inspect_checkpoint(meta_files[version, 1]).file_dims == {}
    for n in (2, 4):
        dims = inspect_checkpoint(meta_files[version, n]).file_dims
        assert dims[EMBED] == dim
        assert dims["output.weight"] == 0 and dims["layers.1.feed_forward.w2.weight"] == 1
        assert "norm.weight" not in dims


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_every_cut_reshards_to_the_slices_of_the_whole_model(meta_files, version, n, m):
    whole = load_rank_state(inspect_checkpoint(meta_files[version, 1]), 0, 1)
    info = inspect_checkpoint(meta_files[version, n], model_parallel_size=m)
    for r in range(m):
        got = load_rank_state(info, r, m)
        assert set(got) == set(whole)
        for k, t in got.items():
            assert torch.equal(t, rank_slice(whole, k, r, m)), (k, r)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_cut_neither_version_makes_is_refused_naming_the_tensor_and_both_cuts(meta_files, tmp_path):
    d = _copy(meta_files[3, 2], tmp_path / "c")
    for i in range(2):
        sd = _file(d, i)
        sd[EMBED] = sd[EMBED][:, :32]  # (64128, 32): cut along both dims
        torch.save(sd, d / f"consolidated.{i:02d}.pth")
    with pytest.raises(CheckpointError) as e:
        inspect_checkpoint(d)
    msg = str(e.value)
    assert "consolidated.00.pth: tok_embeddings.weight has shape [64128, 32]" in msg
    assert "[128256, 32] (Llama 2's ParallelEmbedding, cut along dim 1)" in msg
    assert "[64128, 64] (Llama 3's VocabParallelEmbedding, cut along dim 0)" in msg


def test_files_cut_differently_are_refused(meta_files, tmp_path):
    d = _copy(meta_files[3, 2], tmp_path / "c")
    sd = _file(d, 1)
    sd[EMBED] = _file(meta_files[2, 2], 1)[EMBED].new_zeros(128256, 32)  # Llama 2's cut in the second file
    torch.save(sd, d / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth: tok_embeddings.weight has shape \[128256, 32\], "
                                              r"but consolidated.00.pth holds it as \[64128, 64\]"):
        inspect_checkpoint(d)


def test_metas_fp8_release_is_refused_naming_its_scales(meta_files, tmp_path):
    d = _copy(meta_files[3, 2], tmp_path / "c")
    torch.save({}, d / "fp8_scales_0.pt")
    with pytest.raises(CheckpointError, match=r"FP8 weight scales \(fp8_scales_0.pt\).*quantized.*bf16 release"):
        inspect_checkpoint(d)


def test_float8_weights_are_refused_naming_the_tensor_and_dtype(meta_files, tmp_path):
    d = _copy(meta_files[3, 1], tmp_path / "c")
    sd = _file(d)
    sd["layers.0.feed_forward.w1.weight"] = sd["layers.0.feed_forward.w1.weight"].to(torch.float8_e4m3fn)
    torch.save(sd, d / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"layers.0.feed_forward.w1.weight is torch.float8_e4m3fn"):
        inspect_checkpoint(d)


def test_int4_quantization_args_and_scales_are_refused(meta_files, tmp_path):
    d = _copy(meta_files[3, 1], tmp_path / "c")
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**params, "quantization_args": {"group_size": 32}}))
    with pytest.raises(CheckpointError, match=r"quantization_args \{'group_size': 32\}: a quantized checkpoint"):
        inspect_checkpoint(d)
    (d / "params.json").write_text(json.dumps(params))
    sd = _file(d)
    sd["layers.0.attention.wq.scales"] = torch.ones(4)
    torch.save(sd, d / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"quantization tensors.*wq.scales"):
        inspect_checkpoint(d)


# ---- the engine at model-parallel size 1 against Meta's reference ----

MAX_SEQ_LEN = 128


def test_the_llama2_reference_gives_metas_golden_tokens(golden, tmp_path, mp1):
    """The Llama 2 reference (llama-models' Transformer with Llama 2's rope, on one file) is
    Meta's Llama 2: on the golden weights it answers what Meta's own code answered."""
    from tests.meta_reference import reference_greedy

    one = tmp_path / "golden-1"
    one.mkdir()
    for f in ("params.json", "tokenizer.model"):
        shutil.copy(GOLDEN_CKPT / f, one / f)
    torch.save({k: v.clone() for k, v in load_rank_state(inspect_checkpoint(GOLDEN_CKPT), 0, 1).items()},
               one / "consolidated.00.pth")
    c = golden["completions"]
    got = reference_greedy(one, c["prompt_token_ids"], c["max_gen_len"], golden["max_seq_len"])
    assert [t for t, _ in got] == c["generated_token_ids"]


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("n", [2, 4])
def test_the_engine_gives_the_reference_tokens_from_every_cut(meta_files, meta_references, version, n):
    from llama.reference_api import Llama

    ckpt = meta_files[version, n]
    prompts, want = meta_references[version]
    ours = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=MAX_SEQ_LEN, max_batch_size=len(prompts))
    tokens, logprobs = ours.generate(prompts, META_MAX_GEN, temperature=0, logprobs=True)
    assert tokens == [t for t, _ in want]
    assert all(len(t) > 3 for t in tokens)  # answers long enough to compare
    for got, (_, ref) in zip(logprobs, want):
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
