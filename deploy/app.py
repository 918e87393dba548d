"""build_app: the builder that deploy/config.yaml names (`import_path: deploy.app:build_app`).

Validates the YAML's args, resolves the embedded default model, and sizes the replica's
placement group: bundle 0 for the replica, one bundle per model-parallel rank. Serve options
given in the YAML (num_replicas, placement_group_strategy, ray_actor_options, health checks)
are applied by Serve on top of these.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import ray
import torch
from pydantic import ValidationError
from ray.serve import Application

from cluster.placement import plan_bundles
from deploy.default_model import default_checkpoint
from deploy.server import LlamaDeployment
from deploy.settings import AppArgs
from llama.checkpoint import inspect_checkpoint


def _use_gpu(args: AppArgs) -> bool:
    if args.device != "auto":
        return args.device == "cuda"
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= args.model_parallel_size
    return torch.cuda.is_available()


def build_app(raw_args: dict) -> Application:
    try:
        args = AppArgs(**(raw_args or {}))
    except ValidationError as e:
        raise ValueError(f"deploy/config.yaml args are invalid:\n{e}") from None
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else default_checkpoint()
    # Fail here, with the file and the fix named, rather than inside N rank actors.
    inspect_checkpoint(ckpt_dir, args.tokenizer_path, args.max_seq_len, args.max_batch_size, args.model_parallel_size)
    use_gpu = _use_gpu(args)
    # "auto" is settled here, once, so the bundles and the ranks agree on GPU or CPU.
    gang = replace(args.gang_config(str(ckpt_dir), args.tokenizer_path), device="cuda" if use_gpu else "cpu")
    bundles = plan_bundles(args.model_parallel_size, use_gpu, args.cpus_per_rank, replica_cpus=args.replica_cpus)
    return LlamaDeployment.options(
        placement_group_bundles=bundles,
        ray_actor_options={"num_cpus": args.replica_cpus},
    ).bind(gang, args.model)
