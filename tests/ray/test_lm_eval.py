"""lm-evaluation-harness, a real client (test-only), against the demo model served at MP=2: its
local-completions model finds the remote tokenizer through GET /tokenizer_info, runs the tasks
of demo/eval to the end (generate_until, and loglikelihood through max_tokens 1 with echo and
logprobs), and every loglikelihood and is-greedy it records equals the engine's own for the same
token ids, scored in this process at MP=1."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from deploy.default_model import DEMO_CKPT
from llama.engine.request import GenerationRequest, SamplingParams
from tests.ray.serving import serving

REPO = Path(__file__).resolve().parents[2]
MODEL = "llama-demo"
DOCS = 12  # of demo/eval/demo_qa.jsonl's 25, for each task


@pytest.fixture(scope="module")
def base_url(ray_local):
    with serving({"model": MODEL, "engine": {"max_seq_len": 128, "max_batch_size": 4},
                  "parallel": {"model_parallel_size": 2, "device": "cpu"}}) as url:
        yield url


@pytest.fixture(scope="module")
def engine_scores():
    """(context ids, continuation ids) -> (sum of the continuation's logprobs, all greedy), from
    the engine in this process at MP=1."""
    from llama.reference_api import Llama

    llm = Llama.build(str(DEMO_CKPT), str(DEMO_CKPT / "tokenizer.model"), max_seq_len=128, max_batch_size=4,
                      model_parallel_size=1, device="cpu")

    def score(context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = context + continuation
        out = llm._run([GenerationRequest(tuple(ids), SamplingParams(max_tokens=0, temperature=0, logprobs=1,
                                                                     echo=True))])[0]
        lps, tops = out.prompt_logprobs[len(context):], out.prompt_top_logprobs[len(context):]
        return sum(lps), all(lp >= top[0][1] for lp, top in zip(lps, tops))

    return score


def test_lm_eval_runs_to_the_end_and_its_loglikelihoods_are_the_engines(base_url, engine_scores, monkeypatch):
    monkeypatch.chdir(REPO)  # the tasks name their data file from the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    lm = LocalCompletionsAPI(model=MODEL, base_url=base_url + "/v1/completions", num_concurrent=2, max_retries=1)
    assert lm.tokenizer_backend == "remote"  # found through /tokenizer_info and /tokenize
    assert (lm.eot_token_id, lm.prefix_token_id) == (2, 1)  # EOS and BOS, from their text
    out = lm_eval.simple_evaluate(model=lm, tasks=["demo_qa", "demo_qa_choice"], limit=DOCS, log_samples=True,
                                  task_manager=TaskManager(include_path=str(REPO / "demo" / "eval")))
    # The demo model recites its corpus: every answer word for word, every right choice the likeliest.
    assert out["results"]["demo_qa"]["exact_match,strip"] == 1.0
    assert out["results"]["demo_qa_choice"]["acc,none"] == 1.0
    samples = out["samples"]["demo_qa_choice"]
    assert len(samples) == DOCS and len(out["samples"]["demo_qa"]) == DOCS
    checked = 0
    for sample in samples:
        for args, resp in zip(sample["arguments"], sample["resps"], strict=True):
            context, continuation = args
            (ll, greedy), = resp
            want_ll, want_greedy = engine_scores(*lm._encode_pair(context, continuation))
            assert math.isclose(ll, want_ll, abs_tol=1e-4) and greedy == want_greedy
            checked += 1
    assert checked == 4 * DOCS
