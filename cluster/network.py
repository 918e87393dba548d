"""Which network interface a rank's collectives use: the one that carries its node's Ray IP.

gloo and NCCL pick an interface from the hostname by default; on hosts whose hostname
resolves to 127.0.0.1 (common on Debian and Ubuntu) every rank then advertises loopback and a
rank on another node dials its own machine ("Gloo connectFullMesh failed ... Connection
refused, remote=[127.0.0.1]"). A rank binds to the interface that holds the IP Ray reached
its node on, unless the operator named one (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).
"""
from __future__ import annotations

import fcntl
import socket
import struct
import sys
from collections.abc import Mapping

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_of(ip: str) -> str | None:
    """The name of the local interface whose IPv4 address is `ip`, or None."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                reply = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # down, or no IPv4 address
                continue
        if socket.inet_ntoa(reply[20:24]) == ip:
            return name
    return None


def collective_env(node_ip: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set so gloo and NCCL use the interface carrying `node_ip`; those the
    operator already set are kept. Raises ValueError when no local interface holds the IP."""
    missing = [v for v in IFNAME_VARS if not environ.get(v)]
    if not missing or sys.platform != "linux":  # the interface lookup is Linux's; elsewhere gloo chooses
        return {}
    name = interface_of(node_ip)
    if name is None:
        raise ValueError(
            f"no network interface on this node has the address {node_ip} that Ray uses for it, so the "
            f"collectives cannot be bound to it. Start Ray with --node-ip-address set to an address of this "
            f"node, or set {' and '.join(missing)} to the interface the ranks should use."
        )
    return {v: name for v in missing}
