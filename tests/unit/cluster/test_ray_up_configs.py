"""The `ray up` configurations in cluster/ray_up/ are valid for Ray's own cluster-config schema
(offline: the schema and Ray's default-filling, no cloud call), and keep token authentication
and the project's own Ray on every node."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "cluster" / "ray_up").glob("*.yaml"))


def test_there_is_an_onprem_and_a_cloud_gpu_configuration():
    assert {p.name for p in CONFIGS} == {"onprem.yaml", "aws-gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_valid_for_rays_schema_as_written_and_with_defaults_filled(path: Path):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))
    with pytest.raises(jsonschema.ValidationError):  # the check does look at the keys
        validate_config(prepare_config({**config, "no_such_key": 1}))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_gets_the_token_and_starts_the_projects_ray_with_it(path: Path):
    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if " start " in c]
        assert len(start) == 1 and "RAY_AUTH_MODE=token" in start[0] and "~/llama-ray/.venv/bin/ray" in start[0]
