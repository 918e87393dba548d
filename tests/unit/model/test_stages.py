"""Pipeline stages (llama/model/stages.py): how the layers split, and a stage's names for a
checkpoint's tensors; a stage's model holds only its part (llama/model/transformer.py), and
loading reads only that (llama/checkpoints/load.py)."""
from __future__ import annotations

import pytest

from llama.checkpoints.load import inspect_checkpoint, load_rank_state, rank_nbytes
from llama.checkpoints.make_tiny import make_tiny
from llama.model.stages import Stage, split_layers
from llama.model.transformer import Transformer


def test_an_even_split_gives_the_earlier_stages_the_extra_layers():
    assert split_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert split_layers(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert split_layers(4, 1) == [range(0, 4)]
    assert split_layers(5, 2, [1, 4]) == [range(0, 1), range(1, 5)]


@pytest.mark.parametrize("n_layers,stages,counts,says", [
    (2, 3, None, "every stage needs at least one"),
    (4, 2, [1, 2], "summing to the model's 4 layers"),
    (4, 2, [0, 4], "at least 1 layer each"),
    (4, 2, [4], "must give 2 counts"),
    (4, 0, None, "at least 1"),
])
def test_a_split_that_cannot_be_made_says_what_to_change(n_layers, stages, counts, says):
    with pytest.raises(ValueError, match=says):
        split_layers(n_layers, stages, counts)


def test_a_stage_names_its_layers_from_zero_and_holds_the_ends_it_owns():
    first, last = Stage(0, 2, range(0, 2)), Stage(1, 2, range(2, 3))
    assert first.local_name("layers.1.attention.wq.weight") == "layers.1.attention.wq.weight"
    assert first.local_name("layers.2.attention.wq.weight") is None
    assert last.local_name("layers.2.feed_forward.w2.weight") == "layers.0.feed_forward.w2.weight"
    assert (first.local_name("tok_embeddings.weight"), last.local_name("tok_embeddings.weight")) == (
        "tok_embeddings.weight", None)
    for key in ("norm.weight", "output.weight"):
        assert (first.local_name(key), last.local_name(key)) == (None, key)


@pytest.mark.parametrize("layout", ["meta-1-file", "meta-2-files", "hf-tied", "hf-sharded"])
def test_each_stage_loads_only_its_own_tensors_and_together_they_are_the_model(mp1, tmp_path, layout):
    if layout.startswith("meta"):
        make_tiny(tmp_path, 1 if layout == "meta-1-file" else 2, dim=64, n_layers=3)
    else:
        pytest.importorskip("transformers")
        from tests.hf_reference import CASES, make_hf_checkpoint

        case = next(c for c in sorted(CASES) if ("sharded" in c) == (layout == "hf-sharded")
                    and (layout != "hf-tied" or CASES[c][1].get("tie_word_embeddings")))
        make_hf_checkpoint(tmp_path, case)
    info = inspect_checkpoint(tmp_path)
    whole = load_rank_state(info, 0, 1)
    n = info.args.n_layers
    seen = {}
    for stage in (Stage(0, 2, range(0, n - 1)), Stage(1, 2, range(n - 1, n))):
        model = Transformer(info.args, 32, stage=stage)
        state = load_rank_state(info, 0, 1, stage)
        assert set(state) == {name for name, _ in model.named_parameters()}
        assert rank_nbytes(info, 0, 1, stage) == sum(t.numel() * t.element_size() for t in state.values())
        for key in whole:
            name = stage.local_name(key)
            if name is not None:
                assert key not in seen and state[name].equal(whole[key])
                seen[key] = stage.index
    assert set(seen) == set(whole)
    assert rank_nbytes(info, 0, 1) == sum(t.numel() * t.element_size() for t in whole.values())
