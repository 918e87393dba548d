"""Llama: Meta's reference API (`from llama import Llama`), run on the continuous engine.

Same names, arguments and results as Meta's reference `llama/generation.py` (greedy tokens
and logprobs equal). Differences: gloo on CPU / nccl on CUDA instead of NCCL only; any
model_parallel_size the head counts allow (the checkpoint is resharded); device and dtype are
keyword-only extras; sampled draws are per row (see `_seed_from_global_rng`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import TypedDict

import torch
import torch.distributed as dist

from llama.checkpoints.load import inspect_checkpoint, load_into
from llama.distributed import (
    choose_backend,
    destroy_at_exit,
    init_model_parallel,
    init_single_process_group,
    model_parallel_rank,
    resolve_device,
    resolve_dtype,
)
from llama.engine.config import EngineConfig, check_request
from llama.engine.core import Engine
from llama.engine.request import GenerationOutput, GenerationRequest, SamplingParams, StreamDelta, collect
from llama.model.collectives import use_shared_memory
from llama.model.stage_link import StageLink
from llama.model.stages import Stage, split_layers
from llama.model.transformer import Transformer
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.chat_format import UNSAFE_ERROR, Dialog, encode_dialog, has_special_tags

log = logging.getLogger(__name__)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    generation: dict
    tokens: list[str]
    logprobs: list[float]


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: int | None = None,
        seed: int = 1,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        pipeline_parallel_size: int = 1,
        pipeline_layers: list[int] | None = None,
    ) -> "Llama":
        """Load a checkpoint (Meta's layout or a Hugging Face folder). Starts a one-process group when none exists (plain
        script); under torchrun, the launcher's world is the model-parallel group, or, with
        pipeline_parallel_size P, P pipeline stages of world / P model-parallel ranks each (stage
        s: ranks s * world / P onwards), holding an even split of the layers or pipeline_layers of
        them (llama/model/stages.py)."""
        t0 = time.perf_counter()
        if dist.is_initialized():
            dev = device
            if dev is None and torch.cuda.is_available():
                dev = f"cuda:{dist.get_rank() % torch.cuda.device_count()}"
            dev = resolve_device(dev)
        else:
            dev = resolve_device(device)
            if torch.distributed.is_torchelastic_launched():
                dist.init_process_group(choose_backend(dev))  # torchrun's env:// rendezvous
                destroy_at_exit()
                if dev.type == "cuda" and dev.index is None:
                    dev = torch.device(f"cuda:{dist.get_rank() % torch.cuda.device_count()}")
            else:
                init_single_process_group(choose_backend(dev))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        pp = pipeline_parallel_size
        mp = model_parallel_size or dist.get_world_size() // pp
        # Every prompt of a call prefills in one step, as the reference's first forward does.
        config = EngineConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                              prefill_chunk=max_batch_size * max_seq_len, seed=seed)
        info = inspect_checkpoint(ckpt_dir, tokenizer_path, mp)
        init_model_parallel(mp, pp)
        stage, link = None, None
        if pp > 1:  # every rank samples for itself, so every rank before the last stage takes the logits
            rank = dist.get_rank()
            stage = Stage(rank // mp, pp, split_layers(info.args.n_layers, pp, pipeline_layers)[rank // mp])
            link = StageLink(stage, rank, mp, logits_to=tuple(range(dist.get_world_size())))
        if dev.type == "cpu" and mp > 1 and os.environ.get("LOCAL_WORLD_SIZE") == str(dist.get_world_size()):
            # torchrun's ranks all on this machine: the model's collectives through shared memory
            # (a decode step's tensors; a larger prefill's go through gloo)
            use_shared_memory(max_batch_size * max(info.args.dim, -(-info.args.vocab_size // mp)) * 4, timeout_s=600)
        torch.manual_seed(seed)  # every rank draws the same seeds, so every rank picks the same tokens
        model = Transformer(info.args, max_seq_len, device=dev, dtype=resolve_dtype(dtype, dev), stage=stage)
        load_into(model, info, model_parallel_rank(), mp)
        log.info("loaded %s on %s (%s) at model parallel size %d, %d pipeline stage(s), in %.2fs", ckpt_dir, dev,
                 model.dtype, mp, pp, time.perf_counter() - t0)
        return Llama(model, info.tokenizer(), config, link)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig, link: StageLink | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        # Stepped on the caller's thread. Under torchrun every rank runs its own engine on the
        # same inputs: the scheduler is deterministic and the seeds come from an RNG seeded alike
        # on every rank, so all ranks make the same steps (the reference's lockstep). Each holds
        # the pool the reference allocates, max_batch_size sequences of max_seq_len: the same on
        # every rank (sized by a GPU's free memory, ranks could preempt apart).
        blocks = config.max_batch_size * -(-config.max_seq_len // config.block_size)
        self.engine = Engine(model, tokenizer, config, num_blocks=blocks, link=link)
        self._calls = 0

    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        if not prompt_tokens:
            raise ValueError("no prompts given.")
        if len(prompt_tokens) > self.config.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts in one call; this model was built for max_batch_size "
                             f"{self.config.max_batch_size}. Pass fewer prompts or build with a larger max_batch_size.")
        requests = [
            GenerationRequest(tuple(int(t) for t in p), SamplingParams(
                max_tokens=max_gen_len, temperature=temperature, top_p=top_p,
                seed=_seed_from_global_rng() if temperature > 0 else None,
                logprobs=0 if logprobs else None, echo=echo))
            for p in prompt_tokens
        ]
        outs = self._run(requests)
        out_tokens, out_logprobs = [], []
        for o in outs:
            toks, lps = o.token_ids, o.logprobs
            if echo:
                toks = o.prompt_tokens + toks
                lps = (o.prompt_logprobs or []) + (lps or []) if logprobs else None
                stops = [k for k, t in enumerate(toks) if t in self.tokenizer.stop_ids]
                if stops:  # the reference also cuts at an end token inside the prompt
                    toks, lps = toks[:stops[0]], (lps[:stops[0]] if lps is not None else None)
            out_tokens.append(toks)
            out_logprobs.append(lps)
        return out_tokens, (out_logprobs if logprobs else None)

    def _run(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Submit every request (all checked first, so a bad one leaves nothing queued) and step
        the engine until each has finished."""
        for r in requests:
            check_request(r, self.config.max_seq_len, self.model.args.vocab_size)
        self._calls += 1
        sinks: list[list[StreamDelta]] = [[] for _ in requests]
        for i, r in enumerate(requests):
            self.engine.submit(f"{self._calls}-{i}", r, sinks[i].append)
        while self.engine.step():
            pass
        for s in sinks:
            if s and isinstance(s[-1], BaseException):
                raise s[-1]
        return [collect(list(r.prompt_tokens), s) for r, s in zip(requests, sinks)]

    def text_completion(self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False,
                        echo: bool = False) -> list[CompletionPrediction]:
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        return [{"generation": self.tokenizer.decode(t), **extra}  # type: ignore[typeddict-item]
                for t, extra in self._complete(prompt_tokens, temperature, top_p, max_gen_len, logprobs, echo)]

    def chat_completion(self, dialogs: list[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False) -> list[ChatPrediction]:
        prompt_tokens = [encode_dialog(self.tokenizer, d) for d in dialogs]
        done = self._complete(prompt_tokens, temperature, top_p, max_gen_len, logprobs, echo=False)
        # Meta's reference answers a dialog with special tags with a fixed error text.
        contents = [UNSAFE_ERROR if has_special_tags(d) else self.tokenizer.decode(t) for d, (t, _) in zip(dialogs, done)]
        return [{"generation": {"role": "assistant", "content": c}, **extra}  # type: ignore[typeddict-item]
                for c, (_, extra) in zip(contents, done)]

    def _complete(self, prompt_tokens: list[list[int]], temperature: float, top_p: float, max_gen_len: int | None,
                  logprobs: bool, echo: bool) -> list[tuple[list[int], dict]]:
        """generate, with the reference's default length (as many as fit), and per row its tokens
        plus, when logprobs is set, each token decoded alone and its logprob."""
        if max_gen_len is None:
            max_gen_len = self.config.max_seq_len - 1
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        if not logprobs:
            return [(t, {}) for t in tokens]
        return [(t, {"tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}) for t, lp in zip(tokens, lps)]


def _seed_from_global_rng() -> int:
    """Compatibility shim. The reference draws every row's token from torch's global RNG, so
    `torch.manual_seed(s)` before `generate` makes its samples repeatable; callers rely on that.
    The engine samples each row from a generator of its own, so each sampled row's seed is drawn
    from the global RNG here: the promise holds (and every rank draws alike), though the sampled
    tokens are not the reference's own draws. Greedy results are the reference's exactly."""
    return int(torch.randint(0, 2**62, (1,)).item())
