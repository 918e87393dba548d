"""A gang in pipeline stages (argv[2] stages of argv[3] ranks), each stage on its own node
(STRICT_SPREAD over the stages' bundles), gives Meta's golden tokens and logprobs; print each
rank's IP, stage, rank in its stage and layers, and how the model's collectives went."""
import asyncio
import json
import sys

import ray

from cluster.group import RankGroup
from llama.engine.request import GenerationRequest, SamplingParams
from tests.conftest import GOLDEN_CKPT, GOLDEN_DIR, gang_config

ray.init(address=sys.argv[1], log_to_driver=False)
pp, tp = int(sys.argv[2]), int(sys.argv[3])
c = json.loads((GOLDEN_DIR / "reference.json").read_text())["completions"]
group = RankGroup.start(gang_config(GOLDEN_CKPT, tp, pipeline_parallel_size=pp, max_batch_size=6,
                                    cpus_per_rank=1.0 / tp, placement_strategy="STRICT_SPREAD", rendezvous_timeout_s=60))
try:
    reqs = [GenerationRequest(tuple(p), SamplingParams(max_tokens=c["max_gen_len"], temperature=0, logprobs=0))
            for p in c["prompt_token_ids"]]
    out = group.generate(reqs)
    info = asyncio.run(group.cluster_info())
finally:
    group.shutdown()
diff = max(abs(a - b) for o, w in zip(out, c["results"]) for a, b in zip(o.logprobs, w["logprobs"]))
print(json.dumps({"ranks": [[r["node_ip"], r["stage"], r["tp_rank"], r["layers"]] for r in info["ranks"]],
                  "collectives": info["collectives"], "tokens": [o.token_ids for o in out], "max_logprob_diff": diff}))
