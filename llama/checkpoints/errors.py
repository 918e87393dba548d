"""CheckpointError: what every checkpoint reader raises when the files on disk are missing
something or do not match their config. Its own file, so the readers and their front door
(llama/checkpoints/load.py) all import it without a loop."""
from __future__ import annotations


class CheckpointError(ValueError):
    """The checkpoint on disk is missing something or does not match its params.json."""
