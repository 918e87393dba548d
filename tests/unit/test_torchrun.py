"""`from llama import Llama` under torchrun with two processes (model parallel size 2, gloo):
the golden tokens, and every rank exits cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def test_torchrun_two_ranks_reproduce_the_reference(tmp_path):
    out = tmp_path / "result.json"
    script = Path(__file__).with_name("torchrun_golden.py")
    # Its own session, so a hang can be ended with every worker it started.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads(out.read_text()) == {"world_size": 2, "rank": 0, "match": True}
