"""The Llama Transformer on fairscale's model-parallel layers, one rank's shard of it.

Numbers follow Meta's reference: RMSNorm and softmax in float32, rotary embedding on
interleaved pairs, grouped-query attention (SDPA maps each head to its KV head; nothing is
repeated). Keys and values live in a paged cache (llama/model/kv_cache.py): each token is
written at its flat offset in the block pool, and attention reads a sequence's positions
through its block table. Two forwards: `forward`, any mix of prefill chunks and decodes packed
into one sequence (eager); and `decode`, one token for each of the block table's first rows,
with static shapes and no host synchronisation, so that it can be captured as a CUDA graph
(llama/engine/decode_step.py).
Built on the device and dtype it is given, never touching global defaults; it needs fairscale's
model-parallel state initialised (llama/distributed.py).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.nn.functional as F
from torch import nn

from llama.model.args import ModelArgs
from llama.model.kv_cache import KVCache
from llama.model.linear import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, columns
from llama.model.packed import PackedBatch
from llama.model.stages import Stage


def _keep(x: torch.Tensor) -> torch.Tensor:
    # init_method for fairscale layers: weights come from a checkpoint or the maker.
    return x


@contextlib.contextmanager
def _skip_fairscale_init() -> Iterator[None]:
    """fairscale layers build and scatter a full-size master weight on every rank to
    initialise their shard. Our weights always come from a checkpoint, so that work (and the
    full-size allocation) is skipped while the model is built."""
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_freqs_cis(args: ModelArgs, end: int, device: torch.device) -> torch.Tensor:
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd))
    if args.use_scaled_rope:
        freqs = scale_rope_frequencies(freqs, args)
    t = torch.arange(end, device=device).float()
    freqs = torch.outer(t, freqs)  # (end, head_dim/2)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64 (end, head_dim/2)


def scale_rope_frequencies(freqs: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Llama 3.1's scaling (llama-models' apply_scaling; Hugging Face's rope type "llama3"): low
    frequencies divided by the factor, high ones kept, the band between blended smoothly."""
    factor, low, high, context = (args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                                  args.rope_original_context)
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > context / low, freqs / factor, freqs)
    smooth = (context / wavelen - low) / (high - low)
    return torch.where((wavelen >= context / high) & (wavelen <= context / low),
                       (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # Dims 2i and 2i+1 form one complex number (Meta's interleaved layout).
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (bsz, seqlen, heads, hd/2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])  # (1, seqlen, 1, hd/2)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class Attention(nn.Module):
    COLUMNS = ("wq", "wk", "wv")  # one input: packed side by side on the CPU (llama/model/linear.py)

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        mp = fs_init.get_model_parallel_world_size()
        self.layer_id = layer_id
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.n_kv_heads // mp
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=_keep)
        self.wk = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_keep)
        self.wv = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_keep)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, batch: PackedBatch, cache: KVCache) -> torch.Tensor:
        """x (T, dim): a step's segments packed into one sequence (llama/engine/runner.py);
        freqs_cis (T, hd/2): each token's rotation at its own position."""
        T = x.shape[0]
        xq, xk, xv = columns(self, x)
        xq = xq.view(1, T, self.n_local_heads, self.head_dim)
        xk = xk.view(1, T, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(T, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        xq = xq[0]  # (T, heads, hd)
        cache.write(self.layer_id, batch.write_index, xk[0], xv)
        out = torch.empty_like(xq)  # (T, heads, hd)
        for g in batch.groups:
            keys, values = cache.gather(self.layer_id, g.tables)  # (G, K, kv, hd)
            q = xq[g.query_index].transpose(1, 2)  # (G, heads, L, hd)
            # The reference's repeat_kv + matmul + float32 softmax as one fused call: SDPA maps
            # head h to KV head h // n_rep (enable_gqa) without copying the keys n_rep times.
            o = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=g.mask,
                                               enable_gqa=self.n_rep > 1)  # (G, heads, L, hd)
            out[g.valid_targets] = o.transpose(1, 2).flatten(0, 1)[g.valid_rows]
        return self.wo(out.view(T, -1))

    def decode(self, x: torch.Tensor, freqs_cis: torch.Tensor, write_index: torch.Tensor, tables: torch.Tensor,
               mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x (B, dim): one token for each of table rows 0..B-1; its key and value go to the flat
        pool offset write_index[b]; each row attends to the S positions of its blocks tables[b]
        where mask (B, 1, 1, S) allows."""
        B = x.shape[0]
        xq, xk, xv = columns(self, x)
        xq = xq.view(1, B, self.n_local_heads, self.head_dim)
        xk = xk.view(1, B, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(B, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)  # the packed layout: row b at its own position
        cache.write(self.layer_id, write_index, xk[0], xv)
        keys, values = cache.gather(self.layer_id, tables)  # (B, S, kv, hd)
        # Query head h reads KV head h // n_rep: the n_rep heads of one KV head go in as that head's
        # n_rep query rows. Plain attention then, with no GQA flag (which, with a mask, can send
        # SDPA to its slow math kernel on CUDA), no copy of the keys, and each KV head read once.
        q = xq[0].view(B, self.n_local_kv_heads, self.n_rep, self.head_dim)
        o = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=mask)  # (B, kv, n_rep, hd); the mask broadcasts over both
        return self.wo(o.reshape(B, -1))


class FeedForward(nn.Module):
    COLUMNS = ("w1", "w3")  # one input: packed side by side on the CPU (llama/model/linear.py)

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = columns(self, x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, batch: PackedBatch, cache: KVCache) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, batch, cache)  # (T, dim)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode(self, x: torch.Tensor, freqs_cis: torch.Tensor, write_index: torch.Tensor, tables: torch.Tensor,
               mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        h = x + self.attention.decode(self.attention_norm(x), freqs_cis, write_index, tables, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """One model-parallel rank's shard. Parameters are allocated uninitialised on `device`:
    load a checkpoint (llama/checkpoints/load.py) or initialise them (llama/checkpoints/make_tiny.py)."""

    def __init__(self, args: ModelArgs, max_seq_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, stage: Stage | None = None):
        """stage: the run of layers this rank holds in a pipeline (llama/model/stages.py); None:
        every layer, the embedding and the output, as without a pipeline."""
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be resolved (from the tokenizer) before building the model.")
        self.args = args
        self.stage = stage or Stage.whole(args.n_layers)
        self.max_seq_len = max_seq_len  # positions the rotary table covers
        self.device = torch.device(device)
        self.dtype = dtype
        # fairscale allocates its weights with torch.Tensor(...) on the CPU whatever the default
        # device; each piece is moved to the meta device as soon as it is built, so the host never
        # holds more than one layer. Then the whole shard is allocated once, where it runs.
        meta = torch.device("meta")
        with torch.device("meta"), _skip_fairscale_init():
            # A stage's layers are numbered from 0: its module list and its KV cache hold only them.
            self.layers = nn.ModuleList(TransformerBlock(i, args).to_empty(device=meta)
                                        for i in range(len(self.stage.layers)))
            if self.stage.first:
                self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim, init_method=_keep).to_empty(device=meta)
            if self.stage.last:
                self.norm = RMSNorm(args.dim, eps=args.norm_eps)
                self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, init_method=_keep).to_empty(device=meta)
        self.to(dtype)
        self.to_empty(device=self.device)
        # complex64 (positions, head_dim/2). The reference makes twice max_seq_len; no position
        # past max_seq_len ever runs, and at a 128K context the other half is 128 MiB.
        self.freqs_cis = precompute_freqs_cis(args, max_seq_len, self.device)

    def forward(self, batch: PackedBatch, cache: KVCache, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The one forward, for prefill and decode alike: the packed tokens (T,) of a step's
        segments (llama/engine/runner.py), each at its own position and pool offset -> float32 logits
        (R, vocab) for the packed indices batch.logit_index only. In a pipeline, a stage after the
        first takes the hidden states (T, dim) its predecessor made instead of the tokens, and a
        stage before the last returns its own (T, dim) for the next."""
        h = self.tok_embeddings(batch.tokens) if self.stage.first else hidden  # (T, dim)
        freqs_cis = self.freqs_cis[batch.positions]  # (T, hd/2): each token at its own position
        for layer in self.layers:
            h = layer(h, freqs_cis, batch, cache)
        if not self.stage.last:
            return h
        if batch.logit_index.numel() == 0:  # every rank skips the output's all-gather alike
            return torch.empty((0, self.args.vocab_size), device=self.device)
        h = self.norm(h[batch.logit_index])  # (R, dim): the other positions need no logits
        return self.output(h).float()

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, write_index: torch.Tensor, tables: torch.Tensor,
               cache: KVCache) -> torch.Tensor:
        """One token (B,) for each of table rows 0..B-1, each at its own position (B,), written
        at its flat pool offset write_index (B,), attending to its own positions through its
        blocks tables (B, n) -> float32 logits (B, vocab). Static shapes for a given (B, n), and
        nothing read back to the host: a CUDA graph can capture it. A row with no sequence
        writes into the null block and its logits are not to be read."""
        assert self.stage.count == 1, "a pipeline stage runs `forward` (llama/engine/runner.py), not `decode`"
        h = self.tok_embeddings(tokens)  # (B, dim)
        freqs_cis = self.freqs_cis[positions]  # (B, hd/2)
        kv_len = tables.shape[1] * cache.block_size
        # Row b sees its positions 0..positions[b]: True where attention is allowed.
        mask = (torch.arange(kv_len, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        for layer in self.layers:
            h = layer.decode(h, freqs_cis, write_index, tables, mask, cache)
        return self.output(self.norm(h)).float()

    def new_cache(self, max_rows: int, max_seq_len: int, num_blocks: int | None = None, block_size: int = 16) -> KVCache:
        """A paged KV cache on this shard's device: num_blocks blocks of block_size positions
        (None: enough for max_rows sequences of max_seq_len), tables of max_rows rows."""
        if max_seq_len > self.max_seq_len:
            raise ValueError(f"a cache of {max_seq_len} positions is longer than this model was built for "
                             f"({self.max_seq_len}); build the Transformer with a larger max_seq_len.")
        per_row = -(-max_seq_len // block_size)
        first = self.layers[0].attention
        return KVCache(
            n_layers=len(self.layers),  # a pipeline stage's own
            num_blocks=max_rows * per_row if num_blocks is None else num_blocks,
            block_size=block_size,
            max_rows=max_rows,
            max_blocks_per_row=per_row,
            n_kv_heads=first.n_local_kv_heads,
            head_dim=first.head_dim,
            device=self.device,
            dtype=self.dtype,
        )
