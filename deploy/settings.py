"""AppArgs: the `args:` block of deploy/config.yaml, validated once where configuration enters.

Its sections are the settings' own homes, used as they are: `engine` is llama's EngineConfig,
`parallel` is cluster's ParallelConfig; only what the HTTP app itself needs is declared here.
Unknown keys anywhere are rejected, so a typo is an error at `serve run`, not a silent default.
No error message quotes the value it refuses (hide_input_in_errors): a key, or a key misplaced
under another name, must not reach a log.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from cluster.config import GangConfig, ParallelConfig
from deploy.auth import ApiKeySource, check_key
from deploy.default_model import default_checkpoint
from llama.engine.config import EngineConfig


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    model: str = Field("llama-demo", description="the model id clients send and /v1/models lists")
    ckpt_dir: str | None = Field(None, description="a checkpoint folder (Meta's or Hugging Face's layout); None serves the embedded demo model")
    tokenizer_path: str | None = Field(None, description="the tokenizer file; None: ckpt_dir's tokenizer.json, else its tokenizer.model")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs for the replica's own bundle (bundle 0)")
    prefix_routing: bool = Field(False, description="HTTP through LlamaIngress, which sends each request to the "
                                                    "replica holding its prompt's prefix (deploy/ingress.py)")
    parallel: ParallelConfig = ParallelConfig()
    engine: EngineConfig = EngineConfig()
    api_keys: list[SecretStr] = Field([], description="keys a request may carry (Authorization: Bearer KEY); none and no api_keys_env: no authentication")
    api_keys_env: str | None = Field(None, description="an environment variable of comma-separated keys, read by each replica as it starts; adds to api_keys")

    @field_validator("api_keys")
    @classmethod
    def _keys_fit_a_header(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for i, key in enumerate(keys):
            check_key(key.get_secret_value(), f"api_keys[{i}]")
        return keys

    @field_validator("api_keys_env")
    @classmethod
    def _env_is_a_name(cls, name: str | None) -> str | None:
        # Not quoted back: a key written here by mistake must not reach the log.
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError("api_keys_env must be the name of an environment variable (letters, digits and _, "
                             "e.g. LLAMA_API_KEYS) that holds the keys, not a key itself.")
        return name

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

    def api_key_source(self) -> ApiKeySource:
        return ApiKeySource(tuple(self.api_keys), self.api_keys_env)

    @classmethod
    def parse(cls, raw: dict | None) -> "AppArgs":
        try:
            return cls.model_validate(raw or {})
        except ValidationError as e:
            raise ValueError(f"deploy/config.yaml args are invalid:\n{e}") from None
