"""Ray nodes with their own addresses on this machine: each node is a network namespace on a
bridge (198.51.100.0/24), a PID namespace and a mount namespace with a private /tmp/ray, running
`ray start --block`. Drivers run inside the head node (a Ray driver needs a local raylet).

Nothing outside 198.51.100.0/24 and the namespaces made here is touched, and `stop` removes
every namespace, link and process it made, also after a failure half-way through `start`.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
SUBNET = "198.51.100"  # TEST-NET-2: documentation addresses, never routed anywhere
GCS_PORT = 6379


def unavailable() -> str | None:
    """Why this machine cannot build namespaced nodes, or None when it can."""
    if os.geteuid() != 0:
        return "namespaced nodes need root (network and PID namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"namespaced nodes need the `{tool}` command (iproute2 / util-linux)"
    probe = f"llr-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetnsCluster:
    def __init__(self, n_nodes: int, cpus_per_node: int, workdir: Path) -> None:
        self.tag = secrets.token_hex(2)  # keeps names unique if an old run left something behind
        self.n_nodes = n_nodes
        self.cpus = cpus_per_node
        self.workdir = workdir
        self.ips = [f"{SUBNET}.{i + 1}" for i in range(n_nodes)]
        self.bridge = f"llrbr{self.tag}"
        self.namespaces: list[str] = []
        self.host_links: list[str] = []
        self.nodes: list[subprocess.Popen] = []  # `unshare` of each node; its child is PID 1 inside
        token = workdir / "ray_auth_token"
        token.write_text(secrets.token_hex(32))
        # Ray 2.60 clusters use token authentication: every node and driver gets the same token.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}

    @property
    def address(self) -> str:
        return f"{self.ips[0]}:{GCS_PORT}"

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 120.0) -> None:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self.host_links.append(self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, ip in enumerate(self.ips):
                self._add_namespace(i, ip)
            for i, ip in enumerate(self.ips):
                self._start_node(i, ip)
            self._wait_for_nodes(timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            pid1 = _child_of(node.pid)
            if pid1 is not None:  # PID 1 of the node's namespace: the kernel ends all the node's processes with it
                os.kill(pid1, signal.SIGKILL)
            if node.poll() is None:
                node.kill()
            node.wait(timeout=30)
        self.nodes.clear()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        for link in reversed(self.host_links):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self.host_links.clear()

    def kill_node(self, i: int) -> None:
        """End every process of node i at once, as a machine that loses power."""
        pid1 = _child_of(self.nodes[i].pid)
        if pid1 is not None:
            os.kill(pid1, signal.SIGKILL)

    # ---------------------------------------------------------------- drivers
    def run(self, script: str, *args: str, timeout_s: float = 300.0) -> dict:
        """Run tests/multinode/drivers/<script> inside the head node with the cluster's address
        as its first argument; it prints one JSON object last, which is returned."""
        head = _child_of(self.nodes[0].pid)
        cmd = ["nsenter", "-t", str(head), "-n", "-m", "-p", f"--wd={ROOT}", PYTHON,
               str(ROOT / "tests" / "multinode" / "drivers" / script), self.address, *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise AssertionError(f"{script} failed ({done.returncode}):\n{_tail(done.stderr)}\n{_tail(done.stdout)}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    # ---------------------------------------------------------------- details
    def _add_namespace(self, i: int, ip: str) -> None:
        ns, host_end, node_end = f"llr{self.tag}n{i}", f"llr{self.tag}h{i}", f"llr{self.tag}e{i}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
        self.host_links.append(host_end)
        _ip("link", "set", node_end, "netns", ns)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("link", "set", host_end, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", node_end)
        _ip("-n", ns, "link", "set", node_end, "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def _start_node(self, i: int, ip: str) -> None:
        role = [f"--head", f"--port={GCS_PORT}", "--include-dashboard=false"] if i == 0 else [f"--address={self.address}"]
        ray_start = [RAY, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={self.cpus}",
                     "--disable-usage-stats", *role]
        # A private /tmp/ray (sessions, sockets) per node, then Ray as the namespace's PID 1's child.
        inner = "mount -t tmpfs tmpfs /tmp/ray && exec " + " ".join(ray_start)
        log = open(self.workdir / f"node{i}.log", "w")
        self.nodes.append(subprocess.Popen(
            ["ip", "netns", "exec", self.namespaces[i], "unshare", "--pid", "--fork", "--mount-proc", "--mount",
             "sh", "-c", inner],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def _wait_for_nodes(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while _child_of(self.nodes[0].pid) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        seen = self.run("wait_for_nodes.py", str(self.n_nodes), str(timeout_s), timeout_s=timeout_s + 30)
        if sorted(seen["ips"]) != sorted(self.ips):
            raise RuntimeError(f"expected nodes at {self.ips}, the cluster has {seen['ips']}")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
