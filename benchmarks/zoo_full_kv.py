"""The full-KV baseline of ``zoo_latency.py``: one pinned host buffer per batch and each zoo model's decode
math at the store's precision over it (shape-static and free of host syncs, so a CUDA graph captures
copy + decode: :func:`bench_baseline`).

:class:`FullBuffer` lays out, in ONE contiguous uint8 buffer (each block 256-byte aligned):

    candidates   (B, C) int64
    lengths      (B,) int64           behaviours per user (the long window for sim/eta/sdim/twin)
    <group>.k    (B, R_g, d_a)        every cached K of the FULL model (kv_mode full) at the store dtype
    <group>.v    (B, R_g, d_a)        (SDIM's long group: V only); R_g = min(window, the group's cap)
    keys.<name>  (B, L) or (B, L, m)  retrieval keys, each value in the narrowest integer type that holds
                                      its bits (SIM categories, ETA SimHash, SDIM bucket ids)

:class:`FullKVDecoder` is ``model.decode`` of the full model with the K/V at the store dtype (never cast to
fp32): the candidate's item embedding and the retrieval codes of the candidate (tiny) in fp32, the
projections, attention and MLP at the store dtype; target attention by
``torch.nn.functional.scaled_dot_product_attention`` with a length mask (SIM/ETA over the retrieved rows
gathered), TWIN's per-head top-k + softmax of those scores, SDIM's bucket aggregation, HSTU's SiLU
attention by einsum (no softmax).
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.timing import sync, timed
from collectivekv.cachestore.decode.transfer import KV_TORCH
from collectivekv.model.attention import valid_mask
from collectivekv.model.blocks import ZooCache
from collectivekv.model.cache_spec import group_specs, key_fields
from collectivekv.model.config import ModelConfig
from collectivekv.model.hstu import rel_bucket
from collectivekv.model.retrieval import _rank_and_select, bitmask, gather_positions, sdim_buckets, simhash
from collectivekv.model.retrieval import topk_target_attention as twin_attention

_ALIGN = 256


def key_dtype(bits: int) -> torch.dtype:
    """The narrowest integer type holding ``bits``-bit non-negative values."""
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32 if bits <= 31 else torch.int64


class FullBuffer:
    """A full-KV batch in one pinned host buffer (``host_bytes``) and its device twin (``device_bytes``);
    :meth:`views` are the device tensors by name (module docstring). ``cache``: the full model's cache
    (K/V as float), ``candidates`` (B, C)."""

    def __init__(self, cache: ZooCache, candidates: torch.Tensor, kv_dtype: str, cfg: ModelConfig, pin: bool,
                 device: torch.device) -> None:
        kv = KV_TORCH[kv_dtype]
        sources = {"candidates": (candidates, torch.int64), "lengths": (cache.lengths, torch.int64)}  # (t, dtype)
        for g in group_specs(cfg):
            c = cache.kv[g.name]
            if g.has_k:
                sources[f"{g.name}.k"] = (c.k_user, kv)
            sources[f"{g.name}.v"] = (c.v_user, kv)
        for name, (_, bits) in key_fields(cfg).items():
            sources[f"keys.{name}"] = (cache.keys[name], key_dtype(bits))
        self.spec: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        at = 0
        for name, (t, dtype) in sources.items():
            self.spec[name] = (at, dtype, tuple(t.shape))
            at += -(-t.numel() * dtype.itemsize // _ALIGN) * _ALIGN
        self.nbytes = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.spec.values())
        self.host_bytes = torch.zeros(at, dtype=torch.uint8, pin_memory=pin)
        self.device_bytes = torch.zeros(at, dtype=torch.uint8, device=device)
        host = self._views(self.host_bytes)
        for name, (t, _) in sources.items():
            host[name].copy_(t)  # converts and copies straight into the (pinned) host buffer
        self._device_views = self._views(self.device_bytes)

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, (at, dtype, shape) in self.spec.items():
            size = math.prod(shape) * dtype.itemsize
            out[name] = buf[at: at + size].view(dtype).view(shape)
        return out

    def views(self) -> dict[str, torch.Tensor]:
        """Device tensors by name (views of ``device_bytes``: valid after its copy)."""
        return self._device_views


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, n_heads: int
                ) -> torch.Tensor:
    """Target attention of q (B, C, d_a) over k, v (B, L, d_a), positions >= lengths masked → (B, C, d_a)
    (zeros where lengths is 0), by ``scaled_dot_product_attention``."""
    b, c, d_a = q.shape
    seq, dh = k.shape[1], d_a // n_heads
    qh = q.view(b, c, n_heads, dh).transpose(1, 2)  # (B, H, C, dh)
    kh = k.view(b, seq, n_heads, dh).transpose(1, 2)  # (B, H, L, dh)
    vh = v.view(b, seq, n_heads, dh).transpose(1, 2)
    mask = valid_mask(lengths, seq)[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2).reshape(b, c, d_a)
    return out.nan_to_num(0.0) * (lengths > 0).to(out.dtype)[:, None, None]


def gathered_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, n_sel: torch.Tensor,
                    n_heads: int) -> torch.Tensor:
    """Each candidate over its retrieved rows: q (B, C, d_a), k, v (B, L, d_a), idx (B, C, S), n_sel (B, C)."""
    b, c, d_a = q.shape
    ks = gather_positions(k, idx).flatten(0, 1)  # (B·C, S, d_a)
    vs = gather_positions(v, idx).flatten(0, 1)
    out = sdpa_attend(q.reshape(b * c, 1, d_a), ks, vs, n_sel.reshape(-1), n_heads)  # (B·C, 1, d_a)
    return out.reshape(b, c, d_a)


class FullKVDecoder:
    """``model.decode`` of a full-KV zoo model over :meth:`FullBuffer.views`, at the store dtype ``kv_dtype``
    (module docstring). ``model``: the fp32 full model (its embeddings and hash planes serve the
    candidate's fp32 side); a copy at the store dtype runs the projections, attention and MLP."""

    def __init__(self, model: torch.nn.Module, kv_dtype: str) -> None:
        self.ref, self.cfg = model, model.cfg
        self.low = copy.deepcopy(model).to(KV_TORCH[kv_dtype])
        device = next(model.parameters()).device
        self.bits_table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=device)
        self.item_bits = bitmask(model.item_genres) if self.cfg.arch == "sim" else None  # (n_items + 1,)

    def popcount(self, x: torch.Tensor, n_bits: int) -> torch.Tensor:
        """``model.retrieval.popcount`` with its byte table built once (capturable)."""
        total = torch.zeros_like(x)
        for shift in range(0, n_bits, 8):
            total = total + self.bits_table[(x >> shift) & 0xFF]
        return total

    def __call__(self, v: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) at the store dtype."""
        cfg, low, tgt, lengths = self.cfg, self.low, v["candidates"], v["lengths"]
        t32 = self.ref.item_embedding(tgt)  # (B, C, E) fp32
        t = t32.to(next(low.parameters()).dtype)
        if cfg.arch == "din":
            attn = sdpa_attend(low.q_proj(t), v["kv.k"], v["kv.v"], lengths, cfg.n_heads)
            return low.mlp(torch.cat([attn, t], dim=-1)).squeeze(-1)
        if cfg.arch == "hstu":
            return self.hstu(t, v, lengths)
        short = sdpa_attend(low.short.query(t), v["short.k"], v["short.v"], lengths.clamp(max=cfg.max_len),
                            cfg.n_heads)
        long = self.long_interest(t32, t, tgt, v, lengths)
        return low.mlp(torch.cat([short, long, t], dim=-1)).squeeze(-1)

    def long_interest(self, t32: torch.Tensor, t: torch.Tensor, tgt: torch.Tensor, v: dict[str, torch.Tensor],
                      lengths: torch.Tensor) -> torch.Tensor:
        """(B, C, d_a) long-sequence interest of SIM, ETA, SDIM or TWIN."""
        cfg, arch = self.cfg, self.cfg.arch
        if arch == "sdim":
            return self.sdim(t32, v["long.v"], v["keys.buckets"].to(torch.int64), lengths)
        q = self.low.long.query(t)  # (B, C, d_a)
        if arch == "twin":
            return twin_attention(q, v["long.k"], v["long.v"], lengths, cfg.n_heads, cfg.topk)
        if arch == "sim":
            keys, bits = v["keys.categories"].to(torch.int64), max(1, cfg.n_genres)
            match = self.popcount(keys.unsqueeze(1) & self.item_bits[tgt].unsqueeze(2), bits)  # (B, C, L) shared
            eligible_any = match > 0
        else:  # eta: Hamming distance of the SimHash codes, every valid behaviour eligible
            keys, bits = v["keys.simhash"].to(torch.int64), cfg.hash_bits
            codes = simhash(t32, self.ref.hash_planes)  # (B, C)
            match = bits - self.popcount(keys.unsqueeze(1) ^ codes.unsqueeze(2), bits)  # (B, C, L)
            eligible_any = torch.ones_like(match, dtype=torch.bool)
        seq = keys.shape[1]
        eligible = eligible_any & valid_mask(lengths, seq).unsqueeze(1)  # (B, C, L)
        idx, n_sel = _rank_and_select(match * seq + torch.arange(seq, device=keys.device), eligible, cfg.topk)
        return gathered_attend(q, v["long.k"], v["long.v"], idx, n_sel, cfg.n_heads)

    def sdim(self, t32: torch.Tensor, values: torch.Tensor, buckets: torch.Tensor, lengths: torch.Tensor
             ) -> torch.Tensor:
        """``model.retrieval.sdim_aggregate``: the bucket sums over the (B, L, d_a) values at the store dtype,
        their L2 normalisation (B, C, m, d_a) in fp32 (at fp16 its epsilon rounds to 0: an empty bucket
        would give 0/0)."""
        target = sdim_buckets(t32, self.ref.hash_planes)  # (B, C, m)
        valid = valid_mask(lengths, values.shape[1])  # (B, L)
        collide = (buckets.unsqueeze(1) == target.unsqueeze(2)) & valid[:, None, :, None]  # (B, C, L, m)
        sums = torch.einsum("bclm,bld->bcmd", collide.to(values.dtype), values)  # (B, C, m, d_a)
        return F.normalize(sums.float(), dim=-1).mean(dim=2).to(values.dtype)  # (B, C, d_a)

    def hstu(self, t: torch.Tensor, v: dict[str, torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        """HSTU's decode: each candidate at position n_b attends to the cached layer K/V and to itself."""
        b, c, _ = t.shape
        h, d_a = self.cfg.n_heads, self.cfg.d_attn
        dh = d_a // h
        x = t
        for i, layer in enumerate(self.low.layers):
            kc, vc = v[f"layer{i}.k"], v[f"layer{i}.v"]  # (B, L, d_a)
            seq = kc.shape[1]
            pos = torch.arange(seq, device=t.device)
            dist = (lengths.unsqueeze(1) - pos).clamp(min=0)  # (B, L)
            bias = layer.rel_bias[:, rel_bucket(dist)].permute(1, 0, 2).unsqueeze(2)  # (B, H, 1, L)
            hn = layer.norm_in(x)
            u, q = F.silu(layer.uq(hn)).chunk(2, dim=-1)  # (B, C, d_a) each
            k_new = F.silu(layer.k_branch.proj(hn)).view(b, c, h, dh)  # the full model's K of the candidate
            v_new = F.silu(layer.v_branch.proj(hn)).view(b, c, h, dh)
            qh = q.view(b, c, h, dh)
            scores = torch.einsum("bchd,blhd->bhcl", qh, kc.view(b, seq, h, dh)) / math.sqrt(dh) + bias
            allowed = valid_mask(lengths, seq)[:, None, None, :].to(scores.dtype)  # (B, 1, 1, L)
            w_cache = F.silu(scores) * allowed / layer.norm_len  # (B, H, C, L)
            w_self = F.silu((qh * k_new).sum(-1) / math.sqrt(dh) + layer.rel_bias[:, 0]) / layer.norm_len  # (B, C, H)
            out = torch.einsum("bhcl,blhd->bchd", w_cache, vc.view(b, seq, h, dh)) + w_self.unsqueeze(-1) * v_new
            x = layer.update(x, out.reshape(b, c, d_a), u)
        return self.low.score_hidden(x, t)


def bench_baseline(full_model: torch.nn.Module, cache: ZooCache, candidates: torch.Tensor, kv_dtype: str,
                   device: torch.device, args: argparse.Namespace) -> tuple[dict, torch.Tensor, int]:
    """The full-KV baseline: one pinned buffer → one copy → decode at ``kv_dtype`` (a CUDA graph on a GPU).
    Returns (timing, logits (B, C), bytes copied)."""
    buf = FullBuffer(cache, candidates, kv_dtype, full_model.cfg, pin=device.type == "cuda", device=device)
    decoder = FullKVDecoder(full_model, kv_dtype)

    def step() -> torch.Tensor:
        buf.device_bytes.copy_(buf.host_bytes, non_blocking=True)
        return decoder(buf.views())

    out, run, graph_error = step(), step, None
    if device.type == "cuda":
        try:
            out, run = captured(step, device)
        except Exception as exc:  # timed eagerly instead, and said so in the row
            graph_error = f"{type(exc).__name__}: {exc}"[:300]
            print(f"baseline CUDA graph failed, timed eagerly: {graph_error}", flush=True)
    run()
    sync(device)
    logits = out.clone()
    timing = timed(run, device, args.warmup, args.repeats)
    return {**timing, "graph": graph_error is None, "graph_error": graph_error}, logits, buf.nbytes


def captured(step: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, Callable[[], None]]:
    """``step`` captured in a CUDA graph after a warm-up on a side stream: (its static output, replay)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return out, graph.replay
