"""Train the demo model: a tiny Llama that has learned demo/corpus.txt, saved in Meta's layout.

    python -m demo.train OUTDIR [--steps N --seed S]

Plain PyTorch on CPU with the project's own Transformer at model parallel size 1. Writes
params.json, two consolidated.NN.pth shards cut the fairscale way, and tokenizer.model.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llama.checkpoints.make_tiny import save_sharded, train_tokenizer
from llama.distributed import init_model_parallel, init_single_process_group
from llama.engine.runner import forward_rows
from llama.model.args import ModelArgs
from llama.model.transformer import Transformer
from llama.tokenizers.chat_format import B_INST, E_INST
from llama.tokenizers.load import load_tokenizer

log = logging.getLogger(__name__)

CORPUS = Path(__file__).with_name("corpus.txt")

# params.json as written. 8 query heads over 4 KV heads (GQA); every split size divides by 4,
# so the two shards also load at model parallel size 1, 2 or 4.
PARAMS = {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 64,
          "norm_eps": 1e-5, "vocab_size": -1}
VOCAB_SIZE = 1024  # asked of sentencepiece; the corpus is large enough to fill it exactly
SHARDS = 2


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    seed: int = 0
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3
    min_lr: float = 3e-4  # the cosine ends here
    warmup: int = 100  # steps of linear warmup
    weight_decay: float = 0.1  # on matrices only
    grad_clip: float = 1.0
    log_every: int = 100


# ---------------------------------------------------------------- data


def read_examples(text: str) -> list[str]:
    """One training sequence per Q/A pair and per other line. Each pair also appears in the
    Llama-2 chat format, so /v1/chat/completions answers too."""
    lines = [ln.strip() for ln in text.splitlines()]
    examples: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("Q: ") and i + 1 < len(lines) and lines[i + 1].startswith("A: "):
            question, answer = line[3:], lines[i + 1][3:]
            examples.append(f"Q: {question}\nA: {answer}")
            examples.append(f"{B_INST} {question} {E_INST} {answer}")
            i += 2
            continue
        if line:
            examples.append(line)
        i += 1
    return examples


def make_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets; padding targets are -100 (ignored)."""
    width = max(len(s) for s in seqs) - 1
    inputs = torch.zeros((len(seqs), width), dtype=torch.long)  # (bsz, width)
    targets = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.tensor(s)
        inputs[i, : len(s) - 1] = t[:-1]
        targets[i, : len(s) - 1] = t[1:]
    return inputs, targets


# ---------------------------------------------------------------- model


def init_weights(model: Transformer, args: ModelArgs, seed: int) -> None:
    """GPT-2 style: N(0, 0.02) matrices, residual outputs scaled down by depth, norms at 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            std = 0.02
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                std /= math.sqrt(2 * args.n_layers)
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- training


def train(out_dir: Path, cfg: TrainConfig) -> float:
    """Train and write the checkpoint to out_dir; returns the mean loss of the last 50 steps."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    out_dir.mkdir(parents=True, exist_ok=True)
    examples = read_examples(CORPUS.read_text())
    tok_path = out_dir / "tokenizer.model"
    train_tokenizer(tok_path, VOCAB_SIZE, "\n".join(examples))
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.n_words % 8:
        raise ValueError(
            f"the tokenizer came out with {tokenizer.n_words} pieces, not a multiple of 8, so the "
            f"checkpoint could not be split evenly. Change VOCAB_SIZE in {__file__}."
        )
    seqs = [tokenizer.encode(e, bos=True, eos=True) for e in examples]
    n_tokens = sum(len(s) for s in seqs)
    log.info("%d sequences, %d tokens, longest %d; vocab %d", len(seqs), n_tokens, max(map(len, seqs)), tokenizer.n_words)

    init_single_process_group("gloo")
    init_model_parallel(1)
    args = ModelArgs.from_params({**PARAMS, "vocab_size": tokenizer.n_words})
    args.validate_for(SHARDS)
    model = Transformer(args, max_seq_len=256, device="cpu", dtype=torch.float32)
    init_weights(model, args, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    g = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    recent: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # a fresh shuffle each epoch
            order += torch.randperm(len(seqs), generator=g).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        inputs, targets = make_batch([seqs[i] for i in idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        # The serving forward, each row a whole prompt in a scratch cache: (bsz * width, vocab) float32
        bsz, width = inputs.shape
        logits = forward_rows(model, inputs.tolist())
        loss = F.cross_entropy(logits, targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % cfg.log_every == 0 or step == 0:
            log.info("step %d/%d: loss %.4f (mean of last %d %.4f), lr %.2e, %.1fs",
                     step + 1, cfg.steps, loss.item(), len(recent), sum(recent) / len(recent),
                     lr_at(step, cfg), time.perf_counter() - t0)

    state = {k: v.detach() for k, v in model.state_dict().items()}
    save_sharded(state, PARAMS, out_dir, SHARDS, version=2, dtype=torch.bfloat16)
    final = sum(recent) / len(recent)
    log.info("wrote %s in %.1fs in all", out_dir, time.perf_counter() - t_start)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    final = train(Path(a.out_dir), TrainConfig(steps=a.steps, seed=a.seed))
    print(f"trained {a.steps} steps in {time.perf_counter() - t0:.0f}s, final loss {final:.4f}; wrote {a.out_dir}")


if __name__ == "__main__":
    main()
