"""`python -m deploy.doctor [deploy/config.yaml]`: the pre-flight doctor (cluster/doctor.py) for an
app's configuration, on the running Ray cluster (RAY_ADDRESS, or this node's). Prints a row per
rank and check, with a fix for each failure; exits 1 if any check failed, 2 if it could not run."""
from __future__ import annotations

import sys
from pathlib import Path

import ray
import yaml

from cluster.doctor import diagnose, render
from deploy.settings import AppArgs


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "deploy/config.yaml")
    try:
        apps = yaml.safe_load(path.read_text())["applications"]
        args = AppArgs.parse(apps[0].get("args"))
        gang = args.gang_config()
    except (OSError, KeyError, IndexError, ValueError) as e:
        print(f"{path}: cannot check this configuration: {e}", file=sys.stderr)
        return 2
    ray.init(log_to_driver=False)  # RAY_ADDRESS or the cluster this node belongs to
    rows = diagnose(gang)
    print(render(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
