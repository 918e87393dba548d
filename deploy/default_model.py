"""The embedded default model: the trained demo checkpoint in demo/ckpt, or, when this copy
of the project lacks it, a tiny random model made on first start under ~/.cache/llama-ray/."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_CKPT = Path(__file__).resolve().parent.parent / "demo" / "ckpt"
FALLBACK_DIR = Path.home() / ".cache" / "llama-ray" / "tiny-mp2"


def default_checkpoint() -> Path:
    if (DEMO_CKPT / "params.json").is_file():
        return DEMO_CKPT
    if not (FALLBACK_DIR / "params.json").is_file():
        from llama.checkpoints.make_tiny import make_tiny

        log.info("demo checkpoint not found at %s; making a tiny random one in %s", DEMO_CKPT, FALLBACK_DIR)
        make_tiny(FALLBACK_DIR, shards=2)
    return FALLBACK_DIR
