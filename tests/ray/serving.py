"""Serving a test checkpoint through Ray Serve (MP=2 on CPUs) and checking its answers against
a reference's greedy tokens and logprobs: shared by the checkpoint-format modules."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai

from llama.distributed import free_port


_SERVE_PORTS: dict[str, int] = {}  # Ray instance (its node's id) -> the port of the Serve started in it


@contextmanager
def serving(args: dict) -> Iterator[str]:
    """build_app(args) served by Serve on a free loopback port: its base URL. The gang starts in
    the background; requests wait for it. Afterwards the application is deleted (its replica
    drains and its gang stops; the next call in this Ray waits for that) but Serve's controller
    and proxy stay for the module's next application: starting them again took about 7 s each
    time. Ray's shutdown stops them."""
    import ray
    from ray import serve

    from deploy.app import build_app

    ray_id = ray.get_runtime_context().get_node_id()
    if ray_id not in _SERVE_PORTS:
        _SERVE_PORTS[ray_id] = free_port("127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": _SERVE_PORTS[ray_id]})
    deadline = time.monotonic() + 120
    while "llama" in serve.status().applications:  # the last one still deleting
        assert time.monotonic() < deadline, "the module's last application was not deleted within 120 s"
        time.sleep(0.2)
    serve.run(build_app(args), name="llama", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{_SERVE_PORTS[ray_id]}"
    finally:
        serve.delete("llama", _blocking=False)


def golden_args(model: str) -> dict:
    """build_app's args for the golden checkpoint at MP=2 on CPUs, as the HTTP modules serve it."""
    from tests.conftest import GOLDEN_CKPT

    return {"model": model, "ckpt_dir": str(GOLDEN_CKPT), "engine": {"max_seq_len": 96, "max_batch_size": 6},
            "parallel": {"model_parallel_size": 2, "device": "cpu"}}


@contextmanager
def served(ckpt: Path, model: str, mp: int = 2, max_seq_len: int = 128, pp: int = 1) -> Iterator[openai.OpenAI]:
    """build_app on `ckpt` at model_parallel_size `mp` (in `pp` pipeline stages), and an openai
    client for it."""
    with serving({"model": model, "ckpt_dir": str(ckpt), "engine": {"max_seq_len": max_seq_len, "max_batch_size": 4},
                  "parallel": {"model_parallel_size": mp, "pipeline_parallel_size": pp, "device": "cpu",
                               "cpus_per_rank": 1.0 if pp == 1 else 0.5}}) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def check_completions(client: openai.OpenAI, model: str, prompts: list[str], max_tokens: int,
                      want: list[tuple[list[int], list[float]]]) -> None:
    """Greedy completions of `prompts` give the reference's tokens, and logprobs to 1e-4."""
    resp = client.completions.create(model=model, prompt=prompts, max_tokens=max_tokens, temperature=0, logprobs=0,
                                     extra_body={"return_token_ids": True})
    for choice, (tokens, logprobs) in zip(sorted(resp.choices, key=lambda c: c.index), want):
        assert choice.model_extra["token_ids"] == tokens
        assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, logprobs)) < 1e-4


def check_chat(client: openai.OpenAI, model: str, dialog: list[dict], max_tokens: int, prompt_ids: list[int],
               want: list[int]) -> None:
    """The chat's prompt has the reference formatter's length and its greedy answer is the
    reference's answer to the reference's prompt ids."""
    resp = client.chat.completions.create(model=model, messages=dialog, max_tokens=max_tokens, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.choices[0].model_extra["token_ids"] == want
