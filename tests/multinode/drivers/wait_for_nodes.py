"""Connect to the cluster and wait until N nodes are alive; print their IPs."""
import json
import sys
import time

import ray

address, n, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout_s
while True:
    try:
        ray.init(address=address, log_to_driver=False)
        break
    except ConnectionError:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
while len(alive := [x for x in ray.nodes() if x["Alive"]]) < n and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps({"ips": [x["NodeManagerAddress"] for x in alive]}))
