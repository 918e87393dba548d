"""A gang that needs more nodes than the cluster has: the placement error it raises, and how
long it took to say so."""
import json
import sys
import time

import ray

from cluster.errors import PlacementError
from cluster.group import RankGroup
from tests.conftest import gang_config

ray.init(address=sys.argv[1], log_to_driver=False)
n, ckpt = int(sys.argv[2]), sys.argv[3]
t0 = time.monotonic()
try:
    RankGroup.start(gang_config(ckpt, n, max_batch_size=2, placement_strategy="STRICT_SPREAD", placement_timeout_s=60))
    print(json.dumps({"error": None}))
except PlacementError as e:
    print(json.dumps({"error": str(e), "type": type(e).__name__, "seconds": time.monotonic() - t0}))
