"""Multinode tier: Ray nodes with their own addresses, process tables and /tmp/ray, built on
this machine from network, PID and mount namespaces (tests/multinode/netns.py). Skipped, with
the reason, where they cannot be built (not root, no `ip netns`)."""
from __future__ import annotations

import pytest

from tests.multinode.netns import NetnsCluster, unavailable


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """A head that runs no model work (0 CPUs: GCS, Serve controller and proxy, drivers) and
    three machines of one CPU each."""
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    cluster = NetnsCluster(n_nodes=4, cpus_per_node=1, head_cpus=0, workdir=tmp_path_factory.mktemp("netns"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
