"""AppArgs: the `args:` block of deploy/config.yaml, validated once where configuration enters.

Its sections are the settings' own homes, used as they are: `engine` is llama's EngineConfig,
`parallel` is cluster's ParallelConfig; only what the HTTP app itself needs is declared here.
Unknown keys anywhere are rejected, so a typo is an error at `serve run`, not a silent default.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.config import GangConfig, ParallelConfig
from deploy.default_model import default_checkpoint
from llama.engine import EngineConfig


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("llama-demo", description="the model id clients send and /v1/models lists")
    ckpt_dir: str | None = Field(None, description="a checkpoint folder (Meta's or Hugging Face's layout); None serves the embedded demo model")
    tokenizer_path: str | None = Field(None, description="the tokenizer file; None: ckpt_dir's tokenizer.json, else its tokenizer.model")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs for the replica's own bundle (bundle 0)")
    parallel: ParallelConfig = ParallelConfig()
    engine: EngineConfig = EngineConfig()

    @model_validator(mode="after")
    def _tokenizer_needs_ckpt(self) -> "AppArgs":
        if self.tokenizer_path and not self.ckpt_dir:
            raise ValueError("tokenizer_path is set but ckpt_dir is not: give both, or neither for the demo model.")
        return self

    def gang_config(self, parallel: ParallelConfig | None = None) -> GangConfig:
        """The gang these args describe, its checkpoint inspected (the embedded demo model when
        ckpt_dir is unset); `parallel` replaces the args' own (e.g. with the device settled)."""
        return GangConfig.inspect(self.ckpt_dir or default_checkpoint(), self.tokenizer_path,
                                  parallel or self.parallel, self.engine)

    @classmethod
    def parse(cls, raw: dict | None) -> "AppArgs":
        try:
            return cls.model_validate(raw or {})
        except ValidationError as e:
            raise ValueError(f"deploy/config.yaml args are invalid:\n{e}") from None
