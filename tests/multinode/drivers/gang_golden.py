"""A gang of 2 ranks, one per node (STRICT_SPREAD; or with the settings in argv[2], JSON, on top),
gives Meta's golden tokens; print the ranks' IPs, stages and where their weights came from."""
import asyncio
import json
import sys

import ray

from cluster.group import RankGroup
from llama.engine.request import GenerationRequest, SamplingParams
from tests.conftest import GOLDEN_CKPT, GOLDEN_DIR, gang_config

ray.init(address=sys.argv[1], log_to_driver=False)
c = json.loads((GOLDEN_DIR / "reference.json").read_text())["completions"]
settings = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
group = RankGroup.start(gang_config(GOLDEN_CKPT, 2, **{"max_batch_size": 6, "placement_strategy": "STRICT_SPREAD",
                                                       "rendezvous_timeout_s": 60, **settings}))
try:
    info = asyncio.run(group.cluster_info())
    reqs = [GenerationRequest(tuple(p), SamplingParams(max_tokens=c["max_gen_len"], temperature=0))
            for p in c["prompt_token_ids"]]
    tokens = [o.token_ids for o in group.generate(reqs)]
finally:
    group.shutdown()
print(json.dumps({"rank_ips": [r["node_ip"] for r in info["ranks"]], "tokens": tokens,
                  "stages": [r["stage"] for r in info["ranks"]],
                  "weights_from": [r["weights_from"] for r in info["ranks"]]}))
