"""Run by tests/unit/test_torchrun.py under torchrun: Meta's reference usage with the model cut
into pipeline stages (`Llama.build(..., pipeline_parallel_size=P)`; argv[2], and argv[3] the
layers of each stage, comma-separated, or "even"). Every rank checks the golden completions'
tokens exactly and their logprobs to 1e-4; rank 0 writes its result to argv[1]."""
import json
import sys
from pathlib import Path

from llama import Llama

golden_dir = Path(__file__).resolve().parents[1] / "data" / "golden"
ref = json.loads((golden_dir / "reference.json").read_text())
c = ref["completions"]
pp = int(sys.argv[2])
layers = None if sys.argv[3] == "even" else [int(n) for n in sys.argv[3].split(",")]
generator = Llama.build(str(golden_dir / "ckpt"), str(golden_dir / "ckpt" / "tokenizer.model"),
                        ref["max_seq_len"], ref["max_batch_size"], pipeline_parallel_size=pp, pipeline_layers=layers)
got = generator.text_completion(c["prompts"], temperature=0, max_gen_len=c["max_gen_len"], logprobs=True)
import torch.distributed as dist  # noqa: E402

want = c["results"]
diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g["logprobs"], w["logprobs"]))
model = generator.model
result = {"world_size": dist.get_world_size(), "rank": dist.get_rank(),
          "match": [g["tokens"] for g in got] == [w["tokens"] for w in want] and len(got) == len(want),
          "max_logprob_diff": diff, "layers": len(model.layers), "stage": model.stage.index,
          "holds_embedding": hasattr(model, "tok_embeddings"), "holds_output": hasattr(model, "output"),
          "sent_bytes": generator.engine.runner.link.sent_bytes, "steps": generator.engine.stats.steps,
          "overlapped": generator.engine.stats.overlapped}
out = Path(sys.argv[1])
out.with_name(f"{out.stem}.{dist.get_rank()}.json").write_text(json.dumps(result))
assert result["match"] and diff < 1e-4, f"rank {result['rank']}: {result}"
