"""Run by tests/unit/test_torchrun.py under `torchrun --nproc_per_node 2`: Meta's reference
usage, unchanged. Every rank checks the golden tokens; rank 0 writes its result to argv[1]."""
import json
import sys
from pathlib import Path

from llama import Llama

golden_dir = Path(__file__).resolve().parents[1] / "data" / "golden"
ref = json.loads((golden_dir / "reference.json").read_text())
c = ref["completions"]
generator = Llama.build(str(golden_dir / "ckpt"), str(golden_dir / "ckpt" / "tokenizer.model"),
                        ref["max_seq_len"], ref["max_batch_size"])
tokens, _ = generator.generate(c["prompt_token_ids"], c["max_gen_len"], temperature=0)
import torch.distributed as dist  # noqa: E402

from llama.model.collectives import shared_memory_group  # noqa: E402

group = shared_memory_group()  # torchrun's ranks share this machine: shared memory, on x86-64
result = {"world_size": dist.get_world_size(), "rank": dist.get_rank(), "match": tokens == c["generated_token_ids"],
          "shared_memory_calls": 0 if group is None else group.calls}
if dist.get_rank() == 0:
    Path(sys.argv[1]).write_text(json.dumps(result))
assert result["match"], f"rank {result['rank']}: tokens differ from the reference"
