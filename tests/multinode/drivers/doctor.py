"""The pre-flight doctor on the golden checkpoint at MP=2, STRICT_SPREAD, with the parallel
settings given as JSON (and its `timeout_s`, 15 unless given); print its rows and its table."""
import dataclasses
import json
import sys

import ray

from cluster.doctor import diagnose, render
from tests.conftest import GOLDEN_CKPT, gang_config

ray.init(address=sys.argv[1], log_to_driver=False)
settings = {"max_batch_size": 6, "placement_strategy": "STRICT_SPREAD", **json.loads(sys.argv[2])}
timeout_s = settings.pop("timeout_s", 15)
rows = diagnose(gang_config(GOLDEN_CKPT, 2, **settings), timeout_s=timeout_s)
print(render(rows), file=sys.stderr)
print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "table": render(rows)}))
