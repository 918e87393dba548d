"""Machines with their own addresses on this machine: each node is a network namespace on a
bridge (198.51.100.0/24), a PID namespace and a mount namespace with a private /tmp/ray, running
`ray start --block`, or an SSH server for `ray up` to start Ray on. Drivers run inside the head
node (a Ray driver needs a local raylet).

Nothing outside 198.51.100.0/24 and the namespaces made here is touched, and `stop` removes
every namespace, link and process it made, also after a failure half-way through `start`.
"""
from __future__ import annotations

import json
import os
import pwd
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


def unavailable(ssh: bool = False) -> str | None:
    """Why this machine cannot build namespaced nodes (with an SSH server each), or None."""
    if os.geteuid() != 0:
        return "namespaced nodes need root (network and PID namespaces)"
    tools = ["ip", "unshare", "nsenter", "mount"] + (["/usr/sbin/sshd", "ssh-keygen", "rsync"] if ssh else [])
    for tool in tools:
        if shutil.which(tool) is None:
            return (f"namespaced nodes need `{tool}` (Debian: iproute2, util-linux, openssh-server, rsync; "
                    f"`make test` installs them)")
    probe = f"llr-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# The head declares a machine that stops answering dead after about 3 s (1 s apart, 3 missed),
# not Ray's default of about 15-30 s: the tests that kill a machine wait for that, then for Serve
# to replace the gang; what happens after is the same.
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


class NetnsCluster:
    """n_nodes nodes at 198.51.100.1, .2, ...: each running Ray (`ray start`, node 0 the head),
    or with ssh=True an SSH server only, for `ray up` to start Ray on them from a client
    namespace at 198.51.100.100 (self.client_run)."""

    def __init__(self, n_nodes: int, cpus_per_node: int, workdir: Path, ssh: bool = False,
                 head_cpus: int | None = None) -> None:
        self.tag = secrets.token_hex(2)  # keeps names unique if an old run left something behind
        self.n_nodes = n_nodes
        self.cpus = cpus_per_node
        self.head_cpus = cpus_per_node if head_cpus is None else head_cpus  # 0: the head runs no rank
        self.workdir = workdir
        self.ssh = ssh
        self.ips = [f"{SUBNET}.{i + 1}" for i in range(n_nodes)]
        self.client_ip = f"{SUBNET}.100"
        self.bridge = f"llrbr{self.tag}"
        self.namespaces: list[str] = []
        self.host_links: list[str] = []
        self.nodes: list[subprocess.Popen] = []  # `unshare` of each node; its child is PID 1 inside
        self._ssh_dirs = set(Path("/tmp").glob("ray_ssh_*"))  # Ray's SSH control sockets: what was there before
        token = workdir / "ray_auth_token"
        token.write_text(secrets.token_hex(32))
        # Ray 2.60 clusters use token authentication: every node and driver gets the same token.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), **FAST_NODE_DEATH}

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
            if self.ssh:
                self._add_namespace(len(self.ips), self.client_ip)
                homes = self._prepare_ssh()
                for i, ip in enumerate(self.ips):
                    self._start_node(i, self._sshd(ip), homes[i])
                self._start_node(len(self.ips), "sleep infinity", homes[-1])  # the client: where `ray up` runs
            else:
                for i, ip in enumerate(self.ips):
                    self._start_node(i, self._ray_start(i, ip))
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
        for d in set(Path("/tmp").glob("ray_ssh_*")) - self._ssh_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def kill_node(self, i: int) -> None:
        """End every process of node i at once, as a machine that loses power."""
        pid1 = _child_of(self.nodes[i].pid)
        if pid1 is not None:
            os.kill(pid1, signal.SIGKILL)

    # ---------------------------------------------------------------- drivers
    def run(self, script: str, *args: str, timeout_s: float = 300.0) -> dict:
        """Run tests/multinode/drivers/<script> inside the head node with the cluster's address
        as its first argument; it prints one JSON object last, which is returned."""
        out = self._enter(0, [PYTHON, str(ROOT / "tests" / "multinode" / "drivers" / script), self.address, *args],
                          self.env, timeout_s)
        return _json_line(out)

    def node_shell(self, i: int, command: str) -> None:
        """Run a shell command in node i's mount namespace (e.g. to change what its files read)."""
        pid1 = _child_of(self.nodes[i].pid)
        done = subprocess.run(["nsenter", "-t", str(pid1), "-m", "sh", "-c", command], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"node {i}: {command}: {done.stderr.strip()} ({done.returncode})")

    def start_driver(self, script: str, *args: str) -> subprocess.Popen:
        """Like run, without waiting: for a driver the test acts alongside (see node_loss.py)."""
        pid1 = _child_of(self.nodes[0].pid)
        return subprocess.Popen(["nsenter", "-t", str(pid1), "-n", "-m", "-p", f"--wd={ROOT}", PYTHON,
                                 str(ROOT / "tests" / "multinode" / "drivers" / script), self.address, *args],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run_killing_a_node(self, script: str, workdir: Path, *args: str, timeout_s: float = 400.0) -> dict:
        """Run a driver (with args after workdir) that, when it is ready, names a node's IP in
        workdir/kill; kill that node (kill_node), tell the driver through workdir/killed, and
        return its JSON line."""
        driver = self.start_driver(script, str(workdir), *args)
        try:
            deadline = time.monotonic() + timeout_s
            while not (workdir / "kill").exists():
                assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
                time.sleep(0.1)
            self.kill_node(self.ips.index((workdir / "kill").read_text()))
            (workdir / "killed").write_text("")
            stdout, stderr = driver.communicate(timeout=timeout_s)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert driver.returncode == 0, stderr[-3000:]
        return _json_line(stdout)

    def client_run(self, *cmd: str, timeout_s: float = 600.0) -> str:
        """Run a command in the client namespace (ssh mode), with the client's own home; its output."""
        return self._enter(len(self.ips), list(cmd), self.env, timeout_s)

    def _enter(self, node: int, cmd: list[str], env: dict[str, str], timeout_s: float) -> str:
        pid1 = _child_of(self.nodes[node].pid)
        done = subprocess.run(["nsenter", "-t", str(pid1), "-n", "-m", "-p", f"--wd={ROOT}", *cmd],
                              env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:3])} failed ({done.returncode}):\n{_tail(done.stderr)}\n"
                                 f"{_tail(done.stdout)}")
        return done.stdout

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
        # A default route to an address nobody has, on the test bridge alone: Ray finds a node's
        # own address from its route table, as on a real host; nothing can leave the bridge.
        _ip("-n", ns, "route", "add", "default", "via", f"{SUBNET}.254")

    def _ray_start(self, i: int, ip: str) -> str:
        role = ["--head", f"--port={GCS_PORT}", "--include-dashboard=false"] if i == 0 else [f"--address={self.address}"]
        cpus = self.head_cpus if i == 0 else self.cpus
        return " ".join([RAY, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}",
                         "--disable-usage-stats", *role])

    def _start_node(self, i: int, command: str, home: Path | None = None) -> None:
        """Namespace i's PID 1: a private /tmp/ray (sessions, sockets) and, with `home`, the user's
        home overlaid with that directory (what the node writes there lands in it; ssh and Ray
        find ~ in the password file, not in $HOME), then `command`."""
        # A resolver that answers at once (nothing listens on the namespace's port 53), as a real
        # network's does: the host's nameserver is unreachable from the bridge, and torch's
        # TCPStore then waits ~6 s for each reverse lookup of a peer's address.
        resolv = self.workdir / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        # /tmp/ray must exist to be mounted over: on a machine where Ray never ran, it does not.
        mounts = ["mkdir -p /run/sshd /tmp/ray", "mount -t tmpfs tmpfs /tmp/ray",
                  f"mount --bind {resolv} /etc/resolv.conf"]
        if home is not None:
            real = pwd.getpwuid(os.getuid()).pw_dir
            (home.parent / "overlay-work").mkdir()
            mounts.append(f"mount -t overlay overlay -o lowerdir={real},upperdir={home},"
                          f"workdir={home.parent / 'overlay-work'} {real}")
        inner = " && ".join(mounts) + " && exec " + command
        log = open(self.workdir / f"node{i}.log", "w")
        self.nodes.append(subprocess.Popen(
            ["ip", "netns", "exec", self.namespaces[i], "unshare", "--pid", "--fork", "--mount-proc", "--mount",
             "sh", "-c", inner],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        deadline = time.monotonic() + 30
        while _child_of(self.nodes[-1].pid) is None and time.monotonic() < deadline:
            if self.nodes[-1].poll() is not None:  # its setup failed: say how, not "no nodes" later
                raise RuntimeError(f"node {i} exited ({self.nodes[-1].returncode}) as it started:\n"
                                   f"{_tail((self.workdir / f'node{i}.log').read_text())}")
            time.sleep(0.1)

    # ---------------------------------------------------------------- ssh mode
    def _prepare_ssh(self) -> list[Path]:
        """Keys, and each namespace's home (an overlay on the real one, which is never written):
        the machines' hold ~/llama-ray, this checkout; the client's, the cluster's Ray token."""
        w = self.workdir
        for key in ("id", "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(w / key)], check=True)
        (w / "authorized_keys").write_text((w / "id.pub").read_text())
        homes = [w / f"ns{i}" / "home" for i in range(len(self.ips) + 1)]
        for home in homes[:-1]:
            home.mkdir(parents=True)
            (home / "llama-ray").symlink_to(ROOT)
        homes[-1].joinpath(".ray").mkdir(parents=True)
        homes[-1].joinpath(".ray", "auth_token").write_text((w / "ray_auth_token").read_text())
        return homes

    def _sshd(self, ip: str) -> str:
        w = self.workdir
        opts = {"ListenAddress": ip, "HostKey": w / "host_key", "AuthorizedKeysFile": w / "authorized_keys",
                "PidFile": "none", "StrictModes": "no", "UsePAM": "no", "PasswordAuthentication": "no",
                "PermitRootLogin": "prohibit-password", "Subsystem": "sftp internal-sftp"}
        return "/usr/sbin/sshd -D -e -f /dev/null " + " ".join(f"-o '{k} {v}'" for k, v in opts.items())

    def _wait_for_nodes(self, timeout_s: float) -> None:
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


def _json_line(stdout: str) -> dict:
    """A driver's JSON line: its last line that is one (Ray may print a warning after it, such
    as a killed node's lagging heartbeats)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"the driver printed no JSON line: {stdout[-2000:]!r}")
    return json.loads(lines[-1])
