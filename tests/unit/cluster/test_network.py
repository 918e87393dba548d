"""cluster/network.py: the interface that carries a node's IP, and the variables that bind gloo
and NCCL to it (the multinode tier shows the cross-node failure they prevent)."""
from __future__ import annotations

import pytest

from cluster.network import IFNAME_VARS, collective_env, interface_of


def test_loopback_is_found_and_an_address_no_interface_has_is_not():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("198.51.100.77") is None


def test_binds_both_collectives_to_the_interface_of_the_node_ip():
    assert collective_env("127.0.0.1", {}) == {v: "lo" for v in IFNAME_VARS}


def test_what_the_operator_set_is_kept():
    assert collective_env("127.0.0.1", {"GLOO_SOCKET_IFNAME": "eth7"}) == {"NCCL_SOCKET_IFNAME": "lo"}
    assert collective_env("198.51.100.77", {v: "eth7" for v in IFNAME_VARS}) == {}


def test_an_ip_of_no_local_interface_is_an_error_that_says_what_to_do():
    with pytest.raises(ValueError, match="--node-ip-address.*GLOO_SOCKET_IFNAME"):
        collective_env("198.51.100.77", {})

