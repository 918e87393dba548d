"""AppArgs: the `args:` block of deploy/config.yaml, validated once, then frozen into GangConfig.

Unknown keys are rejected, so a typo in the YAML is an error at `serve run`, not a silent default.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.config import GangConfig


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("llama-demo", description="the model id clients send and /v1/models lists")
    ckpt_dir: str | None = Field(None, description="Meta-format checkpoint dir; None serves the embedded demo model")
    tokenizer_path: str | None = Field(None, description="tokenizer.model; None means ckpt_dir/tokenizer.model")
    model_parallel_size: int = Field(2, ge=1, le=64)
    max_seq_len: int = Field(256, ge=2)
    max_batch_size: int = Field(8, ge=1, description="the engine's slots: sequences decoding at once")
    prefill_chunk: int = Field(64, ge=1, description="prompt tokens run per engine step at most")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["nccl", "gloo"] | None = None
    seed: int = 1
    cpus_per_rank: float = Field(1.0, gt=0)
    replica_cpus: float = Field(1.0, gt=0, description="CPUs for the replica's own bundle (bundle 0)")
    placement_timeout_s: float = Field(300.0, gt=0)
    init_timeout_s: float = Field(600.0, gt=0)
    call_timeout_s: float = Field(600.0, gt=0, description="one engine step longer than this is a hung gang")
    request_timeout_s: float | None = Field(None, gt=0, description="a request's deadline in the engine")

    @model_validator(mode="after")
    def _tokenizer_needs_ckpt(self) -> "AppArgs":
        if self.tokenizer_path and not self.ckpt_dir:
            raise ValueError("tokenizer_path is set but ckpt_dir is not: give both, or neither for the demo model.")
        return self

    def gang_config(self, ckpt_dir: str, tokenizer_path: str | None) -> GangConfig:
        return GangConfig(
            ckpt_dir=ckpt_dir,
            tokenizer_path=tokenizer_path,
            model_parallel_size=self.model_parallel_size,
            max_seq_len=self.max_seq_len,
            max_batch_size=self.max_batch_size,
            device=self.device,
            dtype=self.dtype,
            backend=self.backend,
            seed=self.seed,
            cpus_per_rank=self.cpus_per_rank,
            placement_timeout_s=self.placement_timeout_s,
            init_timeout_s=self.init_timeout_s,
            call_timeout_s=self.call_timeout_s,
            prefill_chunk=self.prefill_chunk,
            request_timeout_s=self.request_timeout_s,
        )
