"""A self-contained LLaMA (1, 2 and 3 shapes): the model, fast sampling, checkpoints, tokenizer.

    python model.py convert SRC DST      # -> our checkpoint folder
    python model.py export OURS HF_DIR   # ours -> a Hugging Face folder
    python model.py sample DST --prompt "Hello"

SRC is Meta's folder (consolidated.*.pth), a Hugging Face folder or a llama.cpp
FILE.gguf; HF_DIR is read by transformers, vLLM and llama.cpp.

Our checkpoint is a folder: `args.json` (ModelArgs), `model.pth` (state dict with Meta's
key names, so a Meta checkpoint needs no renaming) and, when known, the tokenizer:
sentencepiece's `tokenizer.model`, or Hugging Face's `tokenizer.json` (byte-level BPE)
with its `tokenizer_config.json`. The vocabulary travels with the weights.

Departures from Meta's reference: RoPE tables are made per call (no buffer: float32
under a bf16 cast, no care under meta-device init); sampling is batched over prompts of
different lengths (left padding), each row stopping at EOS. Left out, and refused with a
clear error: LLaMA-3's tiktoken tokenizer.model (its tokenizer.json works) and
LLaMA-3.1's RoPE rescaling. No tensor or pipeline parallelism: train.py uses FSDP2.

In order: the model; sampling; checkpoints and conversion; GGUF files and export; the
tokenizers; the command line."""
import contextlib
import functools
import glob
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----- the model --------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    # grouped-query attention; None means n_heads (LLaMA-1, 7B/13B LLaMA-2)
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # LLaMA-2 70B, LLaMA-3
    # explicit SwiGLU width (Hugging Face's intermediate_size); None: Meta's rule
    hidden_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # 500000 for LLaMA-3
    max_seq_len: int = 2048

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.hidden_dim is None:
            # Meta's rule: 2/3 of 4·dim (SwiGLU has three matrices, not two), scaled by
            # ffn_dim_multiplier, rounded up to a multiple of multiple_of
            hidden = int((self.ffn_dim_multiplier or 1) * int(2 * 4 * self.dim / 3))
            step = self.multiple_of
            self.hidden_dim = step * ((hidden + step - 1) // step)

        if (self.dim % self.n_heads or self.n_heads % self.n_kv_heads
                or (self.dim // self.n_heads) % 2):
            raise ValueError(f"ModelArgs: dim={self.dim}, n_heads={self.n_heads}, "
                             f"n_kv_heads={self.n_kv_heads} must give an even head size "
                             "and n_heads divisible by n_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_meta(cls, params: dict, vocab_size: int) -> "ModelArgs":
        """From Meta's params.json; LLaMA-1/2 store vocab_size=-1, so the caller reads
        it off the weights."""
        if params.get("use_scaled_rope"):
            raise CheckpointError("params.json asks for LLaMA-3.1's scaled RoPE, "
                                  "which this model does not implement")
        if params.get("vocab_size", -1) <= 0:
            params = {**params, "vocab_size": vocab_size}
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})

    @classmethod
    def from_hf(cls, config: dict) -> "ModelArgs":
        """From a Hugging Face LlamaConfig (config.json)."""
        # transformers ≥ 5 writes rope_parameters; older ones rope_scaling and rope_theta
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        legacy_type = scaling.get("rope_type", scaling.get("type", "default"))
        rope_type = rope.get("rope_type", legacy_type)
        if rope_type != "default":
            raise CheckpointError(f"config.json asks for rope_type={rope_type!r}; "
                                  "only the default RoPE is implemented")

        dim = config["hidden_size"]
        n_heads = config["num_attention_heads"]
        if config.get("head_dim", dim // n_heads) != dim // n_heads:
            raise CheckpointError(f"config.json: head_dim={config['head_dim']} "
                                  "is not hidden_size/num_attention_heads")

        return cls(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                   vocab_size=config["vocab_size"],
                   n_kv_heads=config.get("num_key_value_heads") or n_heads,
                   hidden_dim=config["intermediate_size"],
                   rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                   norm_eps=config["rms_norm_eps"],
                   max_seq_len=config.get("max_position_embeddings", 2048))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 (bf16 squares lose precision), scale in x's dtype, as Meta
        # and Hugging Face do.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_table(head_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """e^{i·angle} for pair j of a head (components 2j, 2j+1 as one complex number):

        angle = position · theta^(−2j/head_dim)

    complex64, positions.shape + (head_dim/2,): bf16 angles at 2000 are off by radians."""
    pairs = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)  # 2j
    freqs = theta ** (-pairs / head_dim)
    angles = positions.float()[..., None] * freqs
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, D) by rope (B or 1, T, D/2): one complex
    product, in float32."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, D/2)
    return torch.view_as_real(xc * rope[:, :, None, :]).flatten(-2).type_as(x)


class KVCache:
    """Every layer's keys and values while a batch is sampled, in max_len preallocated
    slots; rows are left-padded (row b's prompt starts at slot pad[b]). A forward writes
    its T tokens at slots `pos` (T,) and attends over all slots under a mask, so a
    decode step has the same shapes at every token (torch.compile traces it once, CUDA
    graphs replay it). Unfilled slots are zeros, not uninitialised memory: masked, they
    weigh 0, but 0 · NaN = NaN."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, pad: torch.Tensor, dtype,
                 device):
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.pad = pad.clone()  # (B,)
        self.slots = torch.arange(max_len, device=device)  # (max_len,)

    def reset(self, pad: torch.Tensor):
        """Empty again, for new prompts with this padding; every tensor stays where it is."""
        for t in self.k + self.v:
            t.zero_()
        self.pad.copy_(pad)

    def positions(self, pos: torch.Tensor) -> torch.Tensor:
        """RoPE positions (B, T) of slots pos (T,), counted from each row's first real token."""
        return (pos[None, :] - self.pad[:, None]).clamp(min=0)

    def mask(self, pos: torch.Tensor) -> torch.Tensor:
        """Which slots the queries at slots pos (T,) may see: causal and not padding.
        (B, 1, T, max_len)"""
        keys = self.slots[None, :]  # (1, S)
        queries = pos[:, None]  # (T, 1)
        # A padding slot's query sees only itself: a row of all -inf would make NaN values
        # in the cache.
        real = (keys >= self.pad[:, None, None]) | (keys == queries)  # (B, T, S)
        return ((keys <= queries) & real)[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.head_dim = args.head_dim
        self.layer = layer
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, rope, cache: Optional[KVCache] = None, pos=None, mask=None):
        # (B, T, H or H_kv, D), then (B, H or H_kv, T, D)
        q, k, v = (w(x).unflatten(-1, (-1, self.head_dim)) for w in (self.wq, self.wk, self.wv))
        q, k, v = (t.transpose(1, 2) for t in (apply_rope(q, rope), apply_rope(k, rope), v))

        if cache is not None:
            # sampling: new keys and values go to their slots; queries see all slots
            k = cache.k[self.layer].index_copy_(2, pos, k)
            v = cache.v[self.layer].index_copy_(2, pos, v)
        # causal unless a mask is given: the cache's slots, or a packed row's segments
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True)
        return self.wo(y.transpose(1, 2).flatten(2))  # (B, T, H·D)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, layer: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, cache: Optional[KVCache] = None, pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), rope, cache, pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def init_weights(self, seed: int = 0):
        """Random weights for a model trained from scratch: N(0, 0.02), output layers
        scaled by 1/sqrt(2·n_layers)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.ndim == 1:  # the norms
                p.data.copy_(torch.ones(p.shape))
            elif name.endswith(("wo.weight", "w2.weight")):
                std = 0.02 / math.sqrt(2 * self.args.n_layers)
                p.data.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return self

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                pos: Optional[torch.Tensor] = None, segments: Optional[torch.Tensor] = None):
        """Training (no cache): logits (B, T, V) for tokens (B, T), causal; logits[:, t]
        score token t + 1. segments (B, T), for rows that pack several sequences
        (data.packed_batch): each sequence attends within itself and its positions
        count from its start, as if it stood alone. Sampling: tokens (B, T) go to the
        cache's slots pos (T,) and only the last position's logits (B, 1, V) come back.
        Both go through forward so that FSDP2's hooks, which wrap it, gather the
        weights."""
        if cache is None and segments is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
            mask = None
        elif cache is None:
            positions, mask = packed_positions(segments)
        else:
            positions = cache.positions(pos)
            mask = cache.mask(pos)
        rope = rope_table(self.args.head_dim, positions, self.args.rope_theta)

        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rope, cache, pos, mask)
        h = self.norm(h)

        if cache is None:
            return self.output(h)  # (B, T, V)
        # Few rows, a wide weight: CPU BLAS (MKL) runs W·hᵀ ~2× faster than h·Wᵀ
        # (bench.py); on GPU, one GEMM.
        return (self.output.weight @ h[:, -1].T).T[:, None]  # (B, 1, V)


def packed_positions(segments: torch.Tensor) -> tuple:
    """(positions (B, T), attention mask (B, 1, T, T) bool) of rows that pack several
    sequences, from segments (B, T): the id of the sequence each token is in, equal ids
    contiguous. A token's position counts from its sequence's first token; it attends
    to the tokens before it in the same sequence."""
    T = segments.shape[1]
    index = torch.arange(T, device=segments.device).expand_as(segments)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, 0).cummax(1).values  # each token's sequence start
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return index - first, (same & causal)[:, None]


# ----- sampling: top-p, prefill and decode, generate --------------------------------


def nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero what lies outside the top-p nucleus of probabilities sorted in decreasing
    order (B, K), unnormalised: the smallest set of most likely tokens whose mass
    reaches top_p (a token stays while the mass before it < top_p)."""
    return sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)


def nucleus_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """τ (B,): the least probability in each row's top-p nucleus of probs (B, V), float32;
    the nucleus is {i : p_i ≥ τ}. (Ties at τ all stay: a sort would keep some of them.)

    No sort, which would dominate a small model's CPU decode step (~9 ms for 8 × 32000;
    this takes ~2): a radix select. Non-negative float32s order as their bit patterns,
    so τ's 31 bits are found from the top, 11, 10 and 10 at a time. At each level,
    among the tokens that share the bits found so far, the mass in each bucket of the
    next bits: τ lies in the lowest bucket whose mass, with all above it, still
    reaches the mass left to find. Masses are summed in fixed point (int64 units of
    2^-40): exact, in any order, so every device and batch finds the same τ. (A float32
    cumsum of the sorted probabilities put the boundary one token off in 3 of 3,840
    random rows.)"""
    B = probs.shape[0]
    bits = probs.view(torch.int32).long()  # (B, V)
    mass = (probs * 2.0**40).long()  # (B, V)
    # at least one unit: a top_p below 2^-41 would round to no mass at all, and keep every token
    need = torch.full((B,), max(1, round(top_p * 2**40)), dtype=torch.int64, device=probs.device)
    found = torch.zeros(B, dtype=torch.int64, device=probs.device)  # τ's bits so far
    for shift, width in ((20, 11), (10, 10), (0, 10)):
        high = shift + width  # bits at or above `high` are found
        bucket = (bits >> shift) & ((1 << width) - 1)  # (B, V)
        weight = mass
        if high < 31:
            weight = mass.masked_fill((bits >> high) != (found >> high)[:, None], 0)
        hist = torch.zeros(B, 1 << width, dtype=torch.int64, device=probs.device)
        hist.scatter_add_(1, bucket, weight)  # (B, buckets)
        from_top = hist.flip(-1).cumsum(-1).flip(-1)  # a bucket's mass and all above it
        key = ((from_top >= need[:, None]).sum(-1) - 1).clamp(min=0)  # (B,)
        above = from_top.gather(1, key[:, None]) - hist.gather(1, key[:, None])
        need = need - above.squeeze(1)
        found = found | (key << shift)
    return found.int().view(torch.float32)


def uniforms(generator, rows: int, n: int, device) -> torch.Tensor:
    """The sampling noise of n tokens, (n, rows) float32 in [0, 1), on device. generator:
    None (torch's global one), one torch.Generator, or one per row, so that a row's draws
    ignore its batch. Drawing n at once gives the draws of n tokens drawn one at a time.
    From a CPU generator to a GPU the copy goes through pinned memory and does not wait
    for the GPU (a sync per token otherwise)."""
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand(n, generator=g) for g in generator], 1)
    elif generator is not None:
        u = torch.rand(n, rows, generator=generator, device=generator.device)
    else:
        u = torch.rand(n, rows, device=device)
    if u.device.type == "cpu" and torch.device(device).type == "cuda":
        u = u.pin_memory()
    return u.to(device, non_blocking=True)


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float,
                 u: Optional[torch.Tensor] = None, top_k: int = 0) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) cut to its top-p nucleus,
    (B, V) -> (B,), by inverse-CDF lookup with the row's uniform u (B,) (uniforms; None:
    torch's global generator); temperature 0 is greedy. top_k > 0 first keeps the k
    likeliest tokens and renormalises (transformers' order: top-k, then top-p)."""
    if temperature == 0:
        return logits.argmax(-1)

    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    B, V = probs.shape
    order = None
    if 0 < top_k < V:
        probs, order = probs.topk(top_k, dim=-1)  # (B, k), decreasing
        # a float32 cumsum of the k sorted probabilities, as transformers does (not the
        # fixed point of nucleus_threshold: the boundary may differ by rounding)
        probs = nucleus(probs / probs.sum(-1, keepdim=True), top_p)
    elif top_p < 1.0:
        # the nucleus in vocabulary order, drawn as from the sorted nucleus, except that
        # every token tied with its least probability τ stays (a sort keeps some of them;
        # ties are common in bf16)
        probs = probs.masked_fill(probs < nucleus_threshold(probs, top_p)[:, None], 0.0)

    cdf = probs.cumsum(-1)  # (B, V or k)
    if u is None:
        u = torch.rand(B, device=cdf.device)
    # the first index whose cumulative mass exceeds u · (the row's total mass)
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    j = j.clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    if order is not None:
        j = order.gather(-1, j)
    return j.squeeze(-1)


def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed the left-padded prompts (B, P) into slots 0..P-1 of an empty cache; the next
    token's logits (B, V)."""
    return model(tokens, cache, torch.arange(tokens.shape[1], device=tokens.device))[:, -1]


def decode_one_token(model: Transformer, token: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                     u: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> tuple:
    """The decode step: the last sampled token (B,) goes to slot pos (1,); the next token
    (B,), sampled with the noise u (B,) as sample_top_p does, and whether each row's
    logits held NaN (B,). Its shapes never change (see KVCache), so torch.compile traces
    it once, sampling included (CompiledDecode): no kernel runs outside the graph."""
    logits = model(token[:, None], cache, pos)[:, -1]
    return sample_top_p(logits, temperature, top_p, u, top_k), logits.isnan().any(-1)


class CompiledDecode:
    """decode_one_token compiled once (dynamic shapes; once more for other sampling
    settings) with a persistent KV cache per batch size, for
    generate(..., step=CompiledDecode()). The step writes the cache in
    place; CUDA graphs (mode="reduce-overhead") replay only if every tensor the step
    writes stays where it was, so the cache lives from one generate to the next, its
    tensors marked static, and is emptied, not made anew. A longer rollout or another
    dtype gets a new cache. The prefill is compiled too, on prompts left-padded to a
    multiple of BUCKET tokens: CUDA graphs record one graph per shape, and prompts of
    every length would record one each. For the same reason the weights are copied in
    place into one model kept from one generate to the next (weights): one more copy of
    them in memory."""

    BUCKET = 64

    def __init__(self, mode=None):
        self.step = torch.compile(decode_one_token, dynamic=True, mode=mode)
        self.prefill = torch.compile(prefill, dynamic=True, mode=mode)
        self.caches = {}  # batch size -> KVCache
        self.held = None  # the Transformer that the graphs read their weights from

    def __call__(self, *args):
        return self.step(*args)

    def weights(self, model: Transformer) -> Transformer:
        """model's weights, copied in place into the held model. An optimizer step changes
        them, and train.py's rollouts decode on weights that FSDP2 gathers into new
        storage each time; CUDA graphs replay only on the tensors they recorded."""
        w, held = model.output.weight, self.held
        if held is None or held.args != model.args or \
                (held.output.weight.dtype, held.output.weight.device) != (w.dtype, w.device):
            with torch.device("meta"):
                held = Transformer(model.args)
            self.held = held.to_empty(device=w.device).to(w.dtype).eval()
        with torch.no_grad():
            for mine, theirs in zip(self.held.parameters(), model.parameters()):
                mine.copy_(theirs)
        return self.held

    def cache(self, args: ModelArgs, batch: int, max_len: int, pad: torch.Tensor, dtype,
              device) -> KVCache:
        cache = self.caches.get(batch)
        if cache is not None and cache.slots.numel() >= max_len and cache.k[0].dtype == dtype:
            cache.reset(pad)
            return cache
        cache = KVCache(args, batch, max_len, pad, dtype, device)
        for t in cache.k + cache.v + [cache.pad, cache.slots]:
            torch._dynamo.mark_static_address(t)
        self.caches[batch] = cache
        return cache


def trim_at_eos(out: torch.Tensor, eos_id: int):
    """Cut each row of out (B, n) just after its first EOS: (responses as lists of ids,
    ended as bools), read from the device in one transfer."""
    is_eos = out == eos_id
    ended = is_eos.any(-1)  # (B,); False: the row ran out of tokens
    lengths = torch.where(ended, is_eos.int().argmax(-1) + 1, out.shape[1])
    rows = torch.cat([out, lengths[:, None], ended[:, None].long()], 1).tolist()
    return [row[:row[-2]] for row in rows], [bool(row[-1]) for row in rows]


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, eos_id: int,
             temperature: float = 1.0, top_p: float = 0.9, generator=None, top_k: int = 0,
             step=decode_one_token, sync_every: int = 0):
    """Sample a response for each prompt (id lists of any lengths): trim_at_eos's
    result. Left padding (KVCache) changes no row's result. generator: see uniforms.
    step: see decode_one_token. The host waits for the device once every sync_every
    tokens (0: 16 on a GPU, where each wait stalls the device; 1 on a CPU, where a wait
    is free and a step past the last EOS is not): to test whether every row has ended
    and none has NaN logits, and for the next sync_every tokens' noise."""
    device = model.output.weight.device
    B = len(prompts)
    P = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    if P + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"generate: prompt length {P} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_seq_len {model.args.max_seq_len}")
    if max_new_tokens == 0:
        return [[] for _ in prompts], [False] * B
    every = sync_every or (16 if device.type == "cuda" else 1)
    first = prefill
    if isinstance(step, CompiledDecode):  # its weights, and its prefill on a bucket of lengths
        model = step.weights(model)
        P = min(-(-P // step.BUCKET) * step.BUCKET, model.args.max_seq_len - max_new_tokens)
        first = step.prefill

    pad = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,)
    padded = [[0] * (P - len(p)) + list(p) for p in prompts]  # any id: the cache masks it
    tokens = torch.tensor(padded, device=device)  # (B, P)
    dtype = model.output.weight.dtype
    if isinstance(step, CompiledDecode):  # its persistent cache
        cache = step.cache(model.args, B, P + max_new_tokens, pad, dtype, device)
    else:
        cache = KVCache(model.args, B, P + max_new_tokens, pad, dtype, device)
    logits = first(model, tokens, cache)  # (B, V)

    out = torch.empty((B, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    broken = logits.isnan().any(-1)  # (B,) rows whose logits held NaN: they sample garbage
    pos = torch.tensor([P - 1], device=device)  # the slot of the token fed at n = 1
    for n in range(max_new_tokens):
        if n % every == 0:
            u = uniforms(generator, B, min(every, max_new_tokens - n), device)  # (every, B)
        if n == 0:
            nxt = sample_top_p(logits, temperature, top_p, u[0], top_k)  # (B,)
        else:
            nxt, nan = step(model, nxt, pos + n, cache, u[n % every], temperature, top_p, top_k)
            broken |= nan
        nxt = nxt.masked_fill(done, eos_id)  # an ended row is fed EOS from then on
        out[:, n] = nxt
        done |= nxt == eos_id
        if (n + 1) % every and n + 1 < max_new_tokens:
            continue
        ended, nans = torch.stack([done.all(), broken.any()]).tolist()  # the host waits
        if nans:
            rows = broken.nonzero().flatten().tolist()
            raise FloatingPointError(f"generate: NaN logits by new token {n} in rows {rows}: the "
                                     "model's weights or activations hold NaN or inf (a diverged "
                                     "run, or a checkpoint that overflowed its dtype)")
        if ended:
            break
    return trim_at_eos(out[:, :n + 1], eos_id)


# ----- checkpoints: Meta's and Hugging Face's keys, our folder, conversion ----------


# ours (Meta's names) -> Hugging Face's, per layer, less the ".weight" that all end with
_HF_LAYER_KEYS = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_HF_TOP_KEYS = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
# precomputed RoPE tables that some checkpoints carry; we recompute them
_DROPPED = ("rope.freqs", "rotary_emb.inv_freq")


def hf_key_map(args: ModelArgs) -> dict:
    """Every key of ours -> Hugging Face's; the conversions below are pure functions
    over this map."""
    pairs = list(_HF_TOP_KEYS.items())
    for i in range(args.n_layers):
        pairs += [(f"layers.{i}.{k}", f"model.layers.{i}.{v}") for k, v in _HF_LAYER_KEYS.items()]
    return {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in pairs}


def _rope_permute(key: str, w: torch.Tensor, args: ModelArgs, to_hf: bool) -> torch.Tensor:
    """Reorder the rows of wq/wk (n_heads, resp. n_kv_heads, heads of D rows) between
    the two RoPE layouts; other weights pass through. Meta rotates interleaved pairs
    (x0, x1), (x2, x3), … of each head, Hugging Face halves (x_j, x_{j+D/2}); moving row
    2j to j and 2j+1 to j + D/2 in each head keeps q·k identical."""
    if not key.endswith(("attention.wq.weight", "attention.wk.weight")):
        return w
    D = args.head_dim
    dim = w.shape[1]
    # to HF: (heads, D/2, 2) -> (heads, 2, D/2); back: the reverse
    shape = (-1, D // 2, 2, dim) if to_hf else (-1, 2, D // 2, dim)
    return w.view(shape).transpose(1, 2).reshape(w.shape)


def meta_to_hf(sd: dict, args: ModelArgs) -> dict:
    return {theirs: _rope_permute(ours, sd[ours], args, to_hf=True)
            for ours, theirs in hf_key_map(args).items()}


def hf_to_meta(sd: dict, args: ModelArgs) -> dict:
    sd = {k: v for k, v in sd.items() if not k.endswith(_DROPPED)}
    out = {}
    for ours, theirs in hf_key_map(args).items():
        if theirs not in sd:
            raise CheckpointError(f"Hugging Face checkpoint has no {theirs!r} "
                                  f"(needed for {ours!r})")
        out[ours] = _rope_permute(ours, sd.pop(theirs), args, to_hf=False)
    if sd:
        raise CheckpointError("Hugging Face checkpoint has keys no LLaMA layer uses: "
                              f"{sorted(sd)[:5]}")
    return out


def merge_meta_shards(shards: list, args: ModelArgs) -> dict:
    """Merge Meta's model-parallel shards (13B: 2, 33B: 4, 65B/70B: 8) into one state
    dict: wq, wk, wv, w1, w3, output split along rows, wo and w2 along columns, norms
    replicated, the embedding along columns (LLaMA-1/2) or rows (3)."""
    if len(shards) == 1:
        return shards[0]
    merged = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        if key.endswith("norm.weight"):
            merged[key] = parts[0]
            continue
        split_embedding = key == "tok_embeddings.weight" and parts[0].shape[1] != args.dim
        by_columns = key.endswith(("wo.weight", "w2.weight")) or split_embedding
        merged[key] = torch.cat(parts, dim=1 if by_columns else 0)
    return merged


def check_state_dict(sd: dict, model: nn.Module, source: str):
    """Raise one CheckpointError naming the first missing/unexpected key or wrong shape."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            raise CheckpointError(f"{source}: {what} key {keys[0]!r} ({len(keys)} {what} in all)")
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise CheckpointError(f"{source}: {k!r} has shape {tuple(sd[k].shape)}, "
                                  f"ModelArgs expect {tuple(shape)}")


@contextlib.contextmanager
def atomic_folder(folder: str):
    """Yield a temporary folder beside `folder`; on success it replaces `folder` by
    renames, so a reader (or a process killed mid-write) sees the old folder or the new
    one, never half of either."""
    folder = os.path.abspath(folder)
    tmp = f"{folder}.tmp{os.getpid()}"
    old = f"{folder}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if os.path.isdir(folder):
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(sd: dict, folder: str, args: ModelArgs, tokenizer_path: Optional[str] = None):
    """Write our checkpoint folder, the state dict sd and args, atomically
    (atomic_folder), and the tokenizer at tokenizer_path (find_tokenizer) with the files
    that go with it."""
    with atomic_folder(folder) as tmp:
        torch.save({k: v.detach().cpu() for k, v in sd.items()}, os.path.join(tmp, "model.pth"))
        Path(tmp, "args.json").write_text(json.dumps(asdict(args), indent=2))
        if tokenizer_path:
            copy_tokenizer(tokenizer_path, tmp)


def copy_tokenizer(path: str, dst: str):
    """A tokenizer file into folder dst, with what goes with it: a sentencepiece model's
    added tokens, a tokenizer.json's tokenizer_config.json (its BOS and EOS)."""
    if path.endswith(".json"):
        shutil.copyfile(path, os.path.join(dst, "tokenizer.json"))
        config = Path(path).with_name("tokenizer_config.json")
        if config.is_file():
            shutil.copyfile(config, os.path.join(dst, config.name))
    else:
        shutil.copyfile(path, os.path.join(dst, "tokenizer.model"))
        copy_added_tokens(os.path.dirname(path), dst)


def copy_added_tokens(src: str, dst: str):
    """A chat model's added tokens into dst/added_tokens.json: from src's
    added_tokens.json, or the tokens past the sentencepiece vocabulary in the
    added_tokens_decoder of its tokenizer_config.json (transformers' layout)."""
    added = Path(src, "added_tokens.json")
    config = Path(src, "tokenizer_config.json")
    if added.is_file():
        shutil.copyfile(added, os.path.join(dst, "added_tokens.json"))
    elif config.is_file() and os.path.isfile(os.path.join(src, "tokenizer.model")):
        n = Tokenizer(os.path.join(src, "tokenizer.model")).sp.vocab_size()
        # {id: {"content": text, …}}
        decoder = json.loads(config.read_text()).get("added_tokens_decoder", {})
        tokens = {t["content"]: int(i) for i, t in decoder.items() if int(i) >= n}
        if tokens:
            Path(dst, "added_tokens.json").write_text(json.dumps(tokens, indent=2))


def load_weights(path: str) -> dict:
    """A memory-mapped state dict from a safetensors or torch.save file (.pth, .bin)."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("reading *.safetensors needs `pip install safetensors`") from e
        return load_file(path)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def read_checkpoint(folder: str):
    """(ModelArgs, memory-mapped state dict) of our checkpoint folder."""
    path = os.path.join(folder, "args.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no args.json; convert it first with "
                              f"`python model.py convert SRC {folder}`")
    args = ModelArgs(**json.loads(Path(path).read_text()))
    return args, load_weights(os.path.join(folder, "model.pth"))


def load_model(folder: str, device="cpu", dtype=torch.float32):
    """Load our checkpoint folder: (model in eval mode, Tokenizer or None). The model is
    built on the meta device and assigned the memory-mapped weights, so a 7B checkpoint
    never sits twice in host memory."""
    args, sd = read_checkpoint(folder)
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(sd, model, os.path.join(folder, "model.pth"))
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()

    tok_path = find_tokenizer(folder)
    tokenizer = load_tokenizer(tok_path) if tok_path else None
    if tokenizer is not None and tokenizer.vocab_size != args.vocab_size:
        raise CheckpointError(
            f"{tok_path} has {tokenizer.vocab_size} pieces but args.json says "
            f"vocab_size={args.vocab_size}: the tokenizer belongs to another model")
    return model, tokenizer


def convert(src: str, dst: str):
    """Detect the layout of src (Meta, Hugging Face or a GGUF file) and write our
    checkpoint folder to dst."""
    if src.endswith(".gguf"):
        return convert_gguf(src, dst)

    meta_paths = sorted(glob.glob(os.path.join(src, "consolidated.*.pth")))
    if meta_paths:
        # Meta: params.json + consolidated.00.pth (… .NN.pth for model-parallel releases)
        params = json.loads(Path(src, "params.json").read_text())
        shards = [{k: v for k, v in load_weights(p).items() if not k.endswith(_DROPPED)}
                  for p in meta_paths]
        # Only LLaMA-1/2 lack vocab_size, and they split the embedding along columns:
        # shard 0 has every row.
        args = ModelArgs.from_meta(params, shards[0]["tok_embeddings.weight"].shape[0])
        sd = merge_meta_shards(shards, args)
    elif os.path.isfile(os.path.join(src, "config.json")):
        # Hugging Face: config.json + weights, sharded or not
        config = json.loads(Path(src, "config.json").read_text())
        args = ModelArgs.from_hf(config)
        safetensors = sorted(glob.glob(os.path.join(src, "*.safetensors")))
        paths = safetensors or sorted(glob.glob(os.path.join(src, "pytorch_model*.bin")))
        if not paths:
            raise CheckpointError(f"{src}: config.json but no *.safetensors or pytorch_model*.bin")
        sd = {k: v for p in paths for k, v in load_weights(p).items()}
        if config.get("tie_word_embeddings") and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # LLaMA-3.2 1B/3B share them
        sd = hf_to_meta(sd, args)
    else:
        raise CheckpointError(f"{src}: neither Meta's consolidated.*.pth + params.json "
                              "nor Hugging Face's config.json")

    with torch.device("meta"):
        check_state_dict(sd, Transformer(args), src)
    # the tokenizer beside the weights, or one folder up (Meta's releases)
    tok = find_tokenizer(src) or find_tokenizer(os.path.dirname(os.path.abspath(src)))
    save_checkpoint(sd, dst, args, tok)
    return args


# ----- llama.cpp's GGUF files, and export to Hugging Face ---------------------------


# llama.cpp's tensor names -> ours, per layer:
# "blk.N.attn_q.weight" -> "layers.N.attention.wq.weight"
_GGUF_LAYER_KEYS = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
_GGUF_TOP_KEYS = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


def _gguf_field(reader, key: str, default=None):
    """A GGUF file's metadata value (a number, a string, or a list of them), or default
    when it is absent."""
    return reader.fields[key].contents() if key in reader.fields else default


def read_gguf(path: str):
    """(ModelArgs, float32 state dict, gguf.GGUFReader) of a llama.cpp GGUF file of a
    LLaMA, every tensor dequantised by the gguf package (any type it reads: F32, F16,
    BF16, Q4_0 … Q8_0, the K-quants). q/k layout: llama.cpp's converter stores wq and wk
    rows in Meta's order (interleaved RoPE pairs, undoing Hugging Face's permutation),
    which is ours, so they are taken as they are; transformers permutes them back to its
    halves when it loads one."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading *.gguf needs `pip install gguf`") from e
    reader = gguf.GGUFReader(path)
    field = functools.partial(_gguf_field, reader)

    if field("general.architecture") != "llama":
        raise CheckpointError(f"{path}: general.architecture="
                              f"{field('general.architecture')!r}; only 'llama' is read")
    scaled = field("llama.rope.scaling.type", "none") != "none"
    if scaled or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointError(f"{path} asks for scaled RoPE (LLaMA-3.1), "
                              "which this model does not implement")

    sd = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.N.KIND.weight or KIND.weight
        if parts[0] == "blk":
            ours = f"layers.{parts[1]}.{_GGUF_LAYER_KEYS[parts[2]]}"
        else:
            ours = _GGUF_TOP_KEYS[parts[0]]
        # dequantize returns the (out, in) rows of torch; GGUF's t.shape lists (in, out)
        weight = gguf.quants.dequantize(t.data, t.tensor_type)
        sd[f"{ours}.weight"] = torch.from_numpy(np.array(weight, np.float32))
    sd.setdefault("output.weight", sd["tok_embeddings.weight"])  # none: tied to the embedding

    n_heads = field("llama.attention.head_count")
    args = ModelArgs(dim=field("llama.embedding_length"), n_layers=field("llama.block_count"),
                     n_heads=n_heads, n_kv_heads=field("llama.attention.head_count_kv", n_heads),
                     vocab_size=sd["tok_embeddings.weight"].shape[0],
                     hidden_dim=field("llama.feed_forward_length"),
                     norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
                     rope_theta=float(field("llama.rope.freq_base", 10000.0)),
                     max_seq_len=field("llama.context_length", 2048))
    if field("llama.rope.dimension_count", args.head_dim) != args.head_dim:
        raise CheckpointError(f"{path}: RoPE on {field('llama.rope.dimension_count')} "
                              f"of {args.head_dim} dimensions")
    return args, sd, reader


# llama.cpp's pre-tokenizer names whose splitting is GPT-2's byte-level regex, after
# splitting off each digit or not
_GGUF_PRE = {"default": False, "gpt2": False, "smollm": True}


def gguf_tokenizer(reader, path: str, folder: str):
    """Write a GGUF file's byte-level BPE (tokenizer.ggml.model "gpt2") as
    tokenizer.json, built by the tokenizers library from its vocabulary and merges, and
    a tokenizer_config.json naming BOS and EOS, into folder."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    field = functools.partial(_gguf_field, reader)
    model = field("tokenizer.ggml.model")
    pre = field("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _GGUF_PRE:
        raise CheckpointError(
            f"{path}: tokenizer {model!r} with pre-tokenizer {pre!r}; read here: byte-level BPE "
            f"('gpt2') with {', '.join(_GGUF_PRE)}. For others, load the file with transformers "
            "(from_pretrained(..., gguf_file=…)), save_pretrained, and convert that folder")

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tk = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _GGUF_PRE[pre]:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tk.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    # token type 3 is llama.cpp's CONTROL: the special tokens
    special = [t for t, k in zip(tokens, types) if k == 3]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    bos_id = field("tokenizer.ggml.bos_token_id")
    eos_id = field("tokenizer.ggml.eos_token_id")
    bos, eos = tokens[bos_id], tokens[eos_id]
    if field("tokenizer.ggml.add_bos_token", False):
        # the BOS that encode(bos=True) adds (BPETokenizer)
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                          special_tokens=[(bos, bos_id)])
    tk.save(os.path.join(folder, "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos}
    Path(folder, "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def convert_gguf(src: str, dst: str) -> ModelArgs:
    """A llama.cpp GGUF file of a LLaMA (read_gguf) and its byte-level BPE
    tokenizer -> our checkpoint folder dst."""
    args, sd, reader = read_gguf(src)
    with torch.device("meta"):
        check_state_dict(sd, Transformer(args), src)
    with tempfile.TemporaryDirectory() as tok_folder:
        gguf_tokenizer(reader, src, tok_folder)
        save_checkpoint(sd, dst, args, os.path.join(tok_folder, "tokenizer.json"))
    return args


def export_hf(src: str, dst: str) -> dict:
    """Our checkpoint folder -> a Hugging Face LLaMA folder, written atomically:
    config.json (returned), tokenizer.model and the weights in their dtype with HF's
    names and RoPE layout (model.safetensors, else pytorch_model.bin)."""
    args, sd = read_checkpoint(src)
    hf = {k: v.contiguous() for k, v in meta_to_hf(sd, args).items()}
    # One matrix for input and output (LLaMA-3.2 1B/3B, as converted): stored once,
    # marked tied.
    tied = torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"])
    if tied:
        del hf["lm_head.weight"]

    dtype = str(hf["model.norm.weight"].dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,  # transformers < 5 reads this, ≥ 5 the dict below
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": tied, "torch_dtype": dtype}

    tok = find_tokenizer(src)
    with atomic_folder(dst) as tmp:
        if tok:
            # a sentencepiece model also wants the base model's tokenizer_config.json beside
            # it for AutoTokenizer
            copy_tokenizer(tok, tmp)
            t = load_tokenizer(tok)
            config.update(bos_token_id=t.bos_id, eos_token_id=t.eos_id)
        try:
            from safetensors.torch import save_file
            save_file(hf, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        except ImportError:
            torch.save(hf, os.path.join(tmp, "pytorch_model.bin"))
        Path(tmp, "config.json").write_text(json.dumps(config, indent=2))
    return config


# ----- tokenizers -------------------------------------------------------------------


class Tokenizer:
    """A sentencepiece model (LLaMA-1/2's tokenizer.model as is), no pad id, and added
    tokens: a chat model's markers (ChatML's <|im_start|>) with ids past the vocabulary,
    from added_tokens.json {text: id} beside it. The text between them is tokenised run
    by run, each with a leading space, as transformers' LlamaTokenizer does
    (legacy=True)."""

    def __init__(self, path: str):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:  # e.g. LLaMA-3's tiktoken tokenizer.model
            raise CheckpointError(
                f"{path} is not a sentencepiece model ({e}); supported: sentencepiece tokenizers "
                "(LLaMA-1/2, TinyLlama, Mistral) here; for tiktoken (LLaMA-3) use the model's "
                "tokenizer.json") from None

        added = Path(path).with_name("added_tokens.json")
        self.added = json.loads(added.read_text()) if added.is_file() else {}  # {text: id}
        if any(i < self.sp.vocab_size() for i in self.added.values()):
            raise CheckpointError(f"{added}: added token ids must follow the "
                                  f"{self.sp.vocab_size()} sentencepiece ones")
        self.vocab_size = max([self.sp.vocab_size()] + [i + 1 for i in self.added.values()])

        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the tokenizer needs BOS and EOS ids "
                             f"(bos={self.bos_id}, eos={self.eos_id})")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        parts = [text]
        if self.added:  # the capturing group keeps the added tokens among the parts
            parts = re.split("(" + "|".join(map(re.escape, self.added)) + ")", text)
        ids = []
        for p in filter(None, parts):  # re.split leaves "" between adjacent added tokens
            ids += [self.added[p]] if p in self.added else self.sp.encode(p)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list) -> str:
        """The text of ids, EOS left out; added tokens as their text, the runs between
        them by sentencepiece."""
        added = {i: t for t, i in self.added.items()}
        kept = (i for i in ids if i != self.eos_id)
        pieces = []
        for is_added, run in itertools.groupby(kept, key=lambda i: i in added):
            if is_added:
                pieces += [added[i] for i in run]
            else:
                pieces.append(self.sp.decode(list(run)))
        return "".join(pieces)


class BPETokenizer:
    """A Hugging Face tokenizer.json (byte-level BPE: LLaMA-3, SmolLM2, most current
    models), run by the tokenizers library, with Tokenizer's interface. BOS is what the
    tokenizer's own post-processor adds (LLaMA-3's <|begin_of_text|>; SmolLM2 adds
    none); the BOS and EOS ids come from tokenizer_config.json beside it. Special tokens
    (ChatML's <|im_start|>) are `added`, and are recognised in text as transformers
    recognises them."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:
            raise ImportError(f"{path} is a Hugging Face tokenizer: "
                              "reading it needs `pip install tokenizers`") from e
        try:
            self.tk = HFTokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a plain Exception
            raise CheckpointError(f"{path} is not a Hugging Face tokenizer.json that the "
                                  f"tokenizers library reads ({e})") from None

        config_path = Path(path).with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        names = {key: config.get(key) for key in ("bos_token", "eos_token")}
        for key, name in names.items():
            if isinstance(name, dict):  # an AddedToken written out: {"content": text, …}
                names[key] = name["content"]
        bos, eos = names["bos_token"], names["eos_token"]
        self.bos_id = self.tk.token_to_id(bos) if bos else None
        self.eos_id = self.tk.token_to_id(eos) if eos else None
        if self.eos_id is None:
            raise CheckpointError(f"{config_path}: no eos_token in the tokenizer's vocabulary "
                                  f"({names['eos_token']!r})")

        decoder = self.tk.get_added_tokens_decoder()  # {id: AddedToken}
        self.added = {t.content: i for i, t in decoder.items() if t.special}  # {text: id}
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        return self.tk.encode(text, add_special_tokens=bos).ids + [self.eos_id] * eos

    def decode(self, ids: list) -> str:
        """The text of ids, EOS left out, special tokens as their text."""
        return self.tk.decode([i for i in ids if i != self.eos_id], skip_special_tokens=False)


def find_tokenizer(folder: str) -> Optional[str]:
    """The tokenizer file in a folder: sentencepiece's tokenizer.model first, else
    tokenizer.json; None if neither."""
    paths = [os.path.join(folder, name) for name in ("tokenizer.model", "tokenizer.json")]
    return next((p for p in paths if os.path.isfile(p)), None)


def load_tokenizer(path: str):
    """Tokenizer (sentencepiece) or BPETokenizer (tokenizer.json), by the file's name."""
    if path.endswith(".json"):
        return BPETokenizer(path)
    return Tokenizer(path)


# ----- the command line -------------------------------------------------------------


def main(argv: list):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    helps = {
        "convert": "Meta or Hugging Face checkpoint folder, or GGUF file -> our checkpoint folder",
        "export": "our checkpoint folder -> a Hugging Face LLaMA folder (transformers, vLLM)",
    }
    for cmd, text in helps.items():
        c = sub.add_parser(cmd, help=text)
        c.add_argument("src")
        c.add_argument("dst")
    s = sub.add_parser("sample", help="sample from our checkpoint folder")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    defaults = {"max_new_tokens": 64, "temperature": 1.0, "top_p": 0.9, "top_k": 0, "seed": 0}
    for name, default in defaults.items():
        s.add_argument(f"--{name}", type=type(default), default=default)
    a = parser.parse_args(argv)

    if a.cmd in ("convert", "export"):
        write = convert if a.cmd == "convert" else export_hf
        print(f"wrote {a.dst}: {write(a.src, a.dst)}")
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok = load_model(a.checkpoint, device, dtype)
    if tok is None:
        raise SystemExit(f"{a.checkpoint} has no tokenizer: copy the model's tokenizer.model "
                         "or tokenizer.json into it")
    prompts = [tok.encode(p) for p in a.prompt]
    generator = torch.Generator(device).manual_seed(a.seed)
    outs, ended = generate(model, prompts, a.max_new_tokens, tok.eos_id, a.temperature,
                           a.top_p, generator, a.top_k)
    for p, o, e in zip(a.prompt, outs, ended):
        print(f"{p!r} -> {tok.decode(o)!r}{'' if e else ' [no EOS]'}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
