"""ModelArgs: the shape of a Llama model, read from Meta's params.json.

Derived sizes (head_dim, FFN hidden size, KV heads) are computed in one place so the model, the
checkpoint loader and the maker all agree on them. How long and how many sequences are served
is not the checkpoint's business: that is EngineConfig's (llama/engine/core.py).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (no grouped-query attention)
    vocab_size: int = -1  # -1 -> the tokenizer decides
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama 3: 500000
    # Llama 3.1's rotary frequency scaling for long contexts (llama-models' apply_scaling), with
    # Meta's values; Hugging Face configs give their own in rope_scaling (type "llama3").
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192  # the context the model was trained on before scaling
    # The FFN's hidden size when a checkpoint states it (Hugging Face's intermediate_size);
    # None: Meta's rule from multiple_of and ffn_dim_multiplier.
    ffn_hidden_size: int | None = None
    # The context the model serves, where the checkpoint states it (Hugging Face's
    # max_position_embeddings); None: Meta's published figure for its version (context_length).
    max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def context_length(self) -> int:
        """Positions the model was made for: as the checkpoint states, else Meta's figures (its
        params.json states none): Llama 3.1 and later, whose rotary is scaled, 131,072; Llama 3
        (rope_theta 500,000 unscaled) 8,192; Llama 2 4,096."""
        if self.max_position_embeddings:
            return self.max_position_embeddings
        if self.use_scaled_rope:
            return 131072
        return 8192 if self.rope_theta >= 500000 else 4096

    @property
    def ffn_hidden_dim(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        # Meta's rule: 2/3 of 4*dim, scaled, rounded up to multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params(cls, params: dict) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        if "quantization_args" in params or "lora_args" in params:  # Llama 3.2's INT4 QLoRA / SpinQuant files
            raise ValueError(
                f"params.json has quantization_args {params.get('quantization_args')}: a quantized checkpoint, "
                f"whose weights carry scales. This server serves Meta's bf16 weights: use the bf16 release "
                f"of the same model (e.g. Llama-3.2-1B-Instruct, not its QLORA_INT4_EO8 or SpinQuant variant)."
            )
        if any(k.startswith("vision_") for k in params):
            raise ValueError(f"params.json describes a vision model ({sorted(k for k in params if k.startswith('vision_'))}): "
                             f"this server serves Llama's text models.")
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"params.json has keys this loader does not know: {unknown}. "
                f"Expected only {sorted(known)}; is this a Meta-format Llama checkpoint?"
            )
        return cls(**params)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        try:
            params = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} not found: a Meta-format checkpoint directory holds params.json "
                f"beside its consolidated.NN.pth files."
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}).") from None
        return cls.from_params(params)

    def validate_for(self, model_parallel_size: int) -> None:
        """Raise ValueError when this model cannot be split into `model_parallel_size` ranks."""
        m = model_parallel_size
        if m < 1:
            raise ValueError(f"model_parallel_size must be >= 1, got {m}.")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}.")
        checks = {
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "dim": self.dim,
            "FFN hidden size": self.ffn_hidden_dim,
            "vocab_size": self.vocab_size,
        }
        bad = {k: v for k, v in checks.items() if v > 0 and v % m}
        if bad:
            ok = [d for d in range(1, 9) if all(v <= 0 or v % d == 0 for v in checks.values())]
            raise ValueError(
                f"this model cannot be split into {m} model-parallel ranks: {bad} not divisible "
                f"by {m}. Use a model_parallel_size that divides them, e.g. one of {ok}."
            )
