"""A gang that needs more nodes than the cluster has: the placement error it raises."""
import json
import sys

import ray

from cluster.errors import PlacementTimeoutError
from cluster.group import RankGroup
from tests.conftest import gang_config

ray.init(address=sys.argv[1], log_to_driver=False)
n, ckpt = int(sys.argv[2]), sys.argv[3]
try:
    RankGroup.start(gang_config(ckpt, n, max_batch_size=2, placement_strategy="STRICT_SPREAD", placement_timeout_s=5))
    print(json.dumps({"error": None}))
except PlacementTimeoutError as e:
    print(json.dumps({"error": str(e)}))
