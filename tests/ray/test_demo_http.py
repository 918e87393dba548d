"""The embedded default (demo/ckpt, trained) served as `serve run deploy/config.yaml` serves it:
MP=2 through HTTP gives the same recorded texts as Llama.text_completion at MP=1
(tests/unit/test_demo_model.py holds the MP=1 side)."""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import yaml

from llama.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "data" / "demo_golden.json").read_text())


@pytest.fixture(scope="module")
def client(ray_local):
    from ray import serve

    from deploy.app import build_app

    # The args of the shipped config, unchanged: the default model at its default size.
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    args = config["applications"][0]["args"]
    assert "ckpt_dir" not in args and args["parallel"]["model_parallel_size"] == 2
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="llama", route_prefix="/")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    serve.shutdown()


def test_golden_prompts_through_http_at_mp2(client):
    resp = client.completions.create(model="llama-demo", prompt=GOLDEN["prompts"], max_tokens=GOLDEN["max_gen_len"],
                                     temperature=0)
    assert [c.text for c in resp.choices] == GOLDEN["generations"]
    assert all(c.finish_reason == "stop" for c in resp.choices)  # the demo model ends its answers with EOS


def test_chat_answers_in_words(client):
    resp = client.chat.completions.create(model="llama-demo", temperature=0, max_tokens=32,
                                          messages=[{"role": "user", "content": "What is tensor parallelism?"}])
    assert resp.choices[0].message.content == GOLDEN["generations"][3]
