"""The pre-flight doctor: before serving, check on the gang's real placement that every rank can work.

On one probe actor per rank bundle (placed as the gang would be), it checks that Python, torch,
Ray and NCCL versions agree; the collective backend is available; the GPU a rank sees is the one
Ray assigned; the collectives bind to the interface holding the node's Ray IP; the checkpoint
reads the same on every node (sizes and sampled hashes); then one all-reduce and one broadcast
under a short timeout, with the latency and bandwidth measured between the ranks. `run` prints
one row per rank and check, with a fix for each failure (`python -m deploy.doctor` is the command).
"""
from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import remove_placement_group

from cluster.config import GangConfig
from cluster.network import collective_env, interface_of
from cluster.placement import acquire, plan_bundles, rank_bundles, rank_options, settle_device
from llama.distributed import choose_backend, free_port, resolve_device

_SAMPLE = 16 << 20  # bytes hashed at each end of a shard: a whole 13 GB shard would take minutes
_BANDWIDTH_BYTES = 64 << 20


@dataclass(frozen=True)
class Probe:
    """What one rank found on its node."""

    rank: int
    node_ip: str
    versions: dict[str, str]
    backend: str | None  # None when unavailable (see problem)
    gpu: str  # what the rank sees, or "cpu"
    interface: str | None  # holding node_ip
    env: dict[str, str]  # GLOO_/NCCL_SOCKET_IFNAME as the collectives will use them
    files: dict[str, str]  # checkpoint file name -> "size:sha256 of its ends", or "missing"/"unreadable ..."
    problems: dict[str, str] = field(default_factory=dict)  # check -> what is wrong


@dataclass(frozen=True)
class Row:
    rank: int | str
    node_ip: str
    check: str
    ok: bool
    detail: str
    fix: str = ""


class DoctorProbe:
    """Runs on a rank's bundle; holds nothing but what the checks need."""

    def __init__(self, config: GangConfig, rank: int):
        self.config = config
        self.rank = rank

    def address(self) -> tuple[str, int]:
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def probe(self) -> Probe:
        par, problems = self.config.parallel, {}
        node_ip = ray.util.get_node_ip_address()
        versions = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"}
        backend = gpu = None
        try:
            device = resolve_device(par.device)
            backend = choose_backend(device, par.backend)
            gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
            assigned = [str(g) for g in ray.get_gpu_ids()]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            if device.type == "cuda" and visible.split(",") != assigned:
                problems["gpu"] = f"CUDA_VISIBLE_DEVICES={visible!r} but Ray assigned GPU(s) {assigned}"
        except (ValueError, RuntimeError) as e:
            problems["backend"] = str(e)
        try:
            env = {**{k: os.environ[k] for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in os.environ},
                   **collective_env(node_ip, os.environ)}
        except ValueError as e:
            env, problems["interface"] = {}, str(e)
        return Probe(self.rank, node_ip, versions, backend, gpu or "-", interface_of(node_ip), env,
                     _fingerprints(self.config), problems)

    def collectives(self, master: tuple[str, int], env: dict[str, str], timeout_s: float) -> dict:
        """Join a group of the gang's size, then time a 1-element all-reduce and a broadcast; in
        a pipeline, also each link from a stage's rank to the next stage's (stage_link)."""
        os.environ.update(env)
        world = self.config.parallel.world_size
        device = resolve_device(self.config.parallel.device)
        backend = choose_backend(device, self.config.parallel.backend)
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", world_size=world,
                                rank=self.rank, timeout=timedelta(seconds=timeout_s))
        try:
            check = torch.full((1,), float(self.rank + 1), device=device)
            dist.all_reduce(check)  # 1 + 2 + ... + world on every rank; also connects the ranks
            one = torch.ones(1, device=device)
            t0 = time.perf_counter()
            for _ in range(10):
                dist.all_reduce(one)
            latency = (time.perf_counter() - t0) / 10
            big = torch.zeros(_BANDWIDTH_BYTES // 4, device=device)
            dist.broadcast(big, src=0)
            t0 = time.perf_counter()
            dist.broadcast(big, src=0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            return {"all_reduce_ms": latency * 1e3, "broadcast_gbps": _BANDWIDTH_BYTES * 8 / seconds / 1e9,
                    "sum": float(check.item()), **self._stage_links(device)}
        finally:
            dist.destroy_process_group()

    def _stage_links(self, device: torch.device) -> dict:
        """Where a stage follows this rank's: a send and a receive to its rank there, timed (the
        hidden states' way each step): {"stage_link": {to, round_trip_ms, gbps, echo}}. The
        boundaries go in stage order on every rank, so no two wait on each other."""
        par = self.config.parallel
        tp, stage = par.model_parallel_size, self.rank // par.model_parallel_size
        out: dict = {}
        for boundary in range(par.pipeline_parallel_size - 1):
            if stage not in (boundary, boundary + 1):
                continue
            peer = self.rank + tp if stage == boundary else self.rank - tp
            x = torch.full((1,), float(self.rank), device=device)
            big = torch.zeros(_BANDWIDTH_BYTES // 4, device=device)
            if stage == boundary:  # the sender: ping-pong, then the bytes and an acknowledgement
                dist.send(x, dst=peer)
                dist.recv(x, src=peer)  # the peer's echo: its own rank
                echo = float(x.item())
                t0 = time.perf_counter()
                for _ in range(10):
                    dist.send(x, dst=peer)
                    dist.recv(x, src=peer)
                rtt = (time.perf_counter() - t0) / 10
                t0 = time.perf_counter()
                dist.send(big, dst=peer)
                dist.recv(x, src=peer)
                seconds = time.perf_counter() - t0
                out["stage_link"] = {"to": peer, "round_trip_ms": rtt * 1e3, "echo": echo,
                                     "gbps": _BANDWIDTH_BYTES * 8 / seconds / 1e9}
            else:
                for _ in range(11):
                    dist.recv(x, src=peer)
                    x.fill_(float(self.rank))
                    dist.send(x, dst=peer)
                dist.recv(big, src=peer)
                dist.send(x, dst=peer)
        return out


def _fingerprints(config: GangConfig) -> dict[str, str]:
    ckpt = config.checkpoint
    out = {}
    for path in (*ckpt.shard_paths, ckpt.ckpt_dir / "params.json", ckpt.tokenizer_path):
        try:
            size = os.path.getsize(path)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                h.update(f.read(_SAMPLE))
                f.seek(max(0, size - _SAMPLE))
                h.update(f.read(_SAMPLE))
            out[Path(path).name] = f"{size}:{h.hexdigest()[:16]}"
        except FileNotFoundError:
            out[Path(path).name] = "missing"
        except OSError as e:
            out[Path(path).name] = f"unreadable ({e.strerror})"
    return out


def compare(probes: list[Probe], collective: dict[int, dict | str], ckpt_dir: str) -> list[Row]:
    """The verdict, one row per rank and check: each rank against rank 0 (versions, checkpoint),
    against its own node (GPU, interface), and what its collectives did."""
    rows: list[Row] = []
    ref = probes[0]
    for p in probes:
        def row(check: str, ok: bool, detail: str, fix: str = "") -> None:
            rows.append(Row(p.rank, p.node_ip, check, ok, detail, "" if ok else fix))

        diff = {k: (v, ref.versions[k]) for k, v in p.versions.items() if v != ref.versions[k]}
        row("versions", not diff, ", ".join(f"{k} {v}" for k, v in p.versions.items()) if not diff else
            "; ".join(f"{k} {mine} here, {theirs} on rank 0" for k, (mine, theirs) in diff.items()),
            "install the same versions on every node (the same `make install` / image)")
        row("backend", "backend" not in p.problems, p.backend or p.problems.get("backend", ""),
            "use backend gloo on CPU nodes, or a CUDA build of torch with NCCL on GPU nodes")
        row("gpu", "gpu" not in p.problems, p.problems.get("gpu", p.gpu),
            "let Ray set CUDA_VISIBLE_DEVICES: do not export it in the node's environment")
        elsewhere = {k: v for k, v in p.env.items() if v != p.interface}
        row("interface", "interface" not in p.problems and bool(p.env) and not elsewhere,
            p.problems.get("interface", f"{p.node_ip} on {p.interface}; collectives on " +
                           ", ".join(f"{k}={v}" for k, v in p.env.items())),
            f"unset {' and '.join(elsewhere)} (or set them to {p.interface}, which holds the node's Ray IP)"
            if elsewhere else "start Ray with --node-ip-address set to an address of this node")
        bad = {name: (mine, ref.files.get(name)) for name, mine in p.files.items() if mine != ref.files.get(name)}
        missing = [n for n, v in p.files.items() if not v[0].isdigit()]
        row("checkpoint", not bad and not missing,
            f"{len(p.files)} files, same sizes and hashes as rank 0" if not bad and not missing else
            "; ".join(f"{n}: {mine} here, {theirs} on rank 0" for n, (mine, theirs) in bad.items()) or
            ", ".join(f"{n} {p.files[n]}" for n in missing),
            f"copy rank 0's checkpoint to {ckpt_dir} on {p.node_ip}: every node reads its own copy")
        got = collective.get(p.rank, "did not run")
        if isinstance(got, dict):
            n = len(probes)
            row("collectives", got["sum"] == n * (n + 1) / 2,
                f"all-reduce {got['all_reduce_ms']:.2f} ms, broadcast {got['broadcast_gbps']:.2f} Gbit/s"
                + ("" if got["sum"] == n * (n + 1) / 2 else f"; but the all-reduce summed to {got['sum']}"),
                "the ranks disagree on the group: check that no other job uses this port and versions agree")
            link = got.get("stage_link")
            if link is not None:  # this rank's stage hands its hidden states to the next stage's rank
                to = link["to"]
                row("stage link", link["echo"] == to,
                    f"to rank {to} ({probes[to].node_ip}): round trip {link['round_trip_ms']:.2f} ms, "
                    f"{link['gbps']:.2f} Gbit/s" + ("" if link["echo"] == to else f"; but rank {link['echo']:g} answered"),
                    "the ranks disagree on the group: check that no other job uses this port and versions agree")
        else:
            row("collectives", False, got,
                "make every node reach every other on the interface above (firewall, routes), or set "
                "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME in parallel.env to an interface that does")
    return rows


def diagnose(config: GangConfig, timeout_s: float = 30.0) -> list[Row]:
    """Place probes as the gang would be placed, and check everything; Ray must be initialised."""
    config = replace(config, parallel=settle_device(config.parallel))
    par = config.parallel
    try:
        pg = acquire(plan_bundles(par), par.placement_strategy, min(par.placement_timeout_s, 60.0), par.autoscaling)
    except Exception as e:  # noqa: BLE001 - the verdict is the row
        return [Row("-", "-", "placement", False, str(e),
                    "add nodes, or lower model_parallel_size or pipeline_parallel_size")]
    remote = ray.remote(DoctorProbe)
    bundles = rank_bundles(par)
    probes_actors = [remote.options(**rank_options(par, pg, b, bundles)).remote(config, r) for r, b in enumerate(bundles)]
    try:
        probes = ray.get([a.probe.remote() for a in probes_actors], timeout=timeout_s * 4)
        master = ray.get(probes_actors[0].address.remote())
        calls = {r: a.collectives.remote(master, probes[r].env, timeout_s) for r, a in enumerate(probes_actors)}
        results: dict[int, dict | str] = {}
        for r, ref in calls.items():
            try:
                results[r] = ray.get(ref, timeout=timeout_s * 2)
            except Exception as e:  # noqa: BLE001 - a failed collective is a row, not a crash
                cause = getattr(e, "cause", e)
                results[r] = f"failed: {type(cause).__name__}: {str(cause).splitlines()[0][:200]}"
        return compare(probes, results, str(config.checkpoint.ckpt_dir))
    finally:
        for a in probes_actors:
            ray.kill(a)
        remove_placement_group(pg)


def render(rows: list[Row]) -> str:
    """A table, one row per rank and check; each failure followed by its fix."""
    cells = [("rank", "node", "check", "", "detail")] + [
        (str(r.rank), r.node_ip, r.check, "ok" if r.ok else "FAIL", r.detail) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = []
    for c, r in zip(cells, [None, *rows]):
        lines.append("  ".join(x.ljust(w) for x, w in zip(c[:4], widths)) + "  " + c[4])
        if r is not None and not r.ok:
            lines.append(" " * (sum(widths) + 8) + "fix: " + r.fix)
    failed = sum(not r.ok for r in rows)
    return "\n".join(lines) + f"\n\n{len(rows) - failed} checks ok, {failed} failed"
