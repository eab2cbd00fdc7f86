"""The zoo models' long stages (SIM, ETA, SDIM, TWIN) over the packed batch, one launch per copy piece.

Each stage reads the group ``long`` of the records in place (:mod:`cachestore.decode.fused_long`,
:mod:`cachestore.decode.fused_select`, :func:`cachestore.decode.fused.attend_group`) and writes its results into
buffers made once per batch (:func:`stage_buffers`), so a CUDA graph that copies the batch in pieces can run a stage
once per piece as it lands — each launch serving the users whose records end in its ``chunk`` (lo, hi] and writing
their rows only — and :func:`long_output` reads the stage's (B, C, d_a) output once every piece's launches ran:

    SIM   ``key_select`` (category top-k on the cached bitmasks, or on the genre sets of the pool rows the router
          indices name) → the fused attention over the selected rows (SELECT mode)
    ETA   the same on SimHash Hamming distances
    SDIM  ``bucket_sums`` (per hash function, the sum of the V rows in the candidate's bucket) → after the last
          piece, L2-normalise and mean over the hash functions (``unit_mean``)
    TWIN  ``group_scores`` (per-head scores of every long row) → ``row_topk`` (stable top-k, softmax in the same
          kernel) → ``weighted_values`` per head

One launch (chunk :data:`cachestore.decode.fused_config.ALL_BYTES`) serves every user; the results do not depend on
how the users are split among launches (``tests/cachestore/decode/test_fused_zoo_pieces.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from collectivekv.cachestore.decode.fused import FusedConfig, attend_group
from collectivekv.cachestore.decode.fused_config import ALL_BYTES
from collectivekv.cachestore.decode.fused_long import (
    bucket_sums,
    group_scores,
    unit_mean,
    weighted_values,
)
from collectivekv.cachestore.decode.fused_select import key_select, row_topk
from collectivekv.cachestore.decode.fused_view import GroupView, may_misalign
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.model.cache_spec import key_bits
from collectivekv.model.config import ModelConfig

# TWIN's score launch: 4 heads (of 8) and 2 blocks of rows a program, 4 warps — 0.044 ms a batch of B 512, L 1,000
# (fp16, one H100) against 0.059 ms with one head, one block and one warp a program (benchmarks/zoo_launch_sweep.py).
# fp32 stores sum each head on a tile of its own (head_loop): the 4-head tile sums a head's products in another order,
# which moves fp32 scores by an ulp and reorders near-tied scores at the top-k boundary (logits off by ~1e-3); head by
# head the scores are the one-head launch's, bit for bit (zoo_launch_sweep_float32.json: "equal")
SCORES_LAUNCH = {"heads_per_program": 4, "num_warps": 4, "blocks_per_program": 2}


@dataclass(frozen=True)
class LongStage:
    """What a long stage reads: the model, the store's layout and config, the packed batch, the candidates'
    long inputs (``fused_zoo.long_inputs``: q (B, C, d_a) for SIM / ETA / TWIN, the retrieval targets for SIM /
    ETA / SDIM), the group ``long``'s view and pools, every part's byte start (B,) (``fused_zoo.part_starts``),
    the router-index flags, the launch config and the group's (K, V) int8 scales
    (:func:`cachestore.decode.fused_view.group_scales`), the buffers the launches write (:func:`stage_buffers`)
    and the chunk (lo, hi] of record ends this launch serves."""

    model: torch.nn.Module
    cfg: ModelConfig
    layout: EntryLayout
    store_cfg: ModelConfig
    raw: torch.Tensor
    q: torch.Tensor | None
    targets: torch.Tensor | None
    view: GroupView
    pools: tuple[torch.Tensor, torch.Tensor]
    part_starts: dict[str, torch.Tensor]
    flags: torch.Tensor
    config: FusedConfig
    scales: tuple[float, float]
    buffers: dict[str, torch.Tensor]
    codes: torch.Tensor | None = None  # SIM / ETA keyed by their pool rows: (M,) keys of the long K pool (pool_keys)
    chunk: tuple[int, int] = ALL_BYTES[0]


def stage_buffers(cfg: ModelConfig, b: int, c: int, cap: int, device: torch.device) -> dict[str, torch.Tensor]:
    """What the short and long stages of ``cfg.arch`` write for B users × C candidates over a long group of ``cap``
    rows (R = B·C): ``short`` (B, C, d_a) fp32; the long stage's ``out`` (B, C, d_a) fp32 (SIM, ETA, TWIN) and its
    intermediates — SIM / ETA ``sel`` (R, k), ``n_sel`` (R,); TWIN ``scores`` (R, H, cap), ``weights`` /
    ``positions`` (R·H, k); SDIM ``sums`` (R, m, d_a)."""
    r, d_a, heads, cap = b * c, cfg.d_attn, cfg.n_heads, max(1, cap)
    k = min(cfg.topk, cap)
    f32 = dict(dtype=torch.float32, device=device)
    short = {"short": torch.empty(b, c, d_a, **f32)}
    if cfg.arch == "sdim":
        return short | {"sums": torch.empty(r, cfg.sdim_hashes, d_a, **f32)}
    out = short | {"out": torch.empty(b, c, d_a, **f32)}
    if cfg.arch == "twin":
        return out | {"scores": torch.empty(r, heads, cap, **f32), "weights": torch.empty(r * heads, k, **f32),
                      "positions": torch.empty(r * heads, k, dtype=torch.int64, device=device)}
    return out | {"sel": torch.zeros(r, k, dtype=torch.int64, device=device),
                  "n_sel": torch.zeros(r, dtype=torch.int64, device=device)}


def long_output(cfg: ModelConfig, buffers: dict[str, torch.Tensor], b: int, c: int) -> torch.Tensor:
    """The long stage's (B, C, d_a) fp32 output once every launch ran (SDIM: the normalised mean of its sums)."""
    if cfg.arch == "sdim":
        return unit_mean(buffers["sums"]).reshape(b, c, -1)
    return buffers["out"]


def _row_bytes(layout: EntryLayout, part: str) -> int:
    """Bytes per row of the store's part named ``part``."""
    return layout.row_bytes[[p.name for p in layout.parts].index(part)]


def _select(s: LongStage, name: str, hamming: bool, codes: torch.Tensor | None = None) -> None:
    """Retrieve on the packed key bytes (:func:`cachestore.decode.fused_select.key_select`: the ``topk`` best
    eligible rows per candidate of ``s.targets``), or on ``codes`` (M,) of the long K router indices, attend over
    them (the fused kernel, SELECT mode, unsplit: it writes only this launch's users)."""
    part = f"keys.{name}" if codes is None else s.view.group.idx_part("k")
    key_bytes = _row_bytes(s.layout, part)
    bits = key_bits(s.store_cfg)
    cap = max(1, s.view.group.cap)
    sel = (s.buffers["sel"], s.buffers["n_sel"])
    idx, n_sel = key_select(s.raw, s.part_starts[part], s.view.rows, cap, key_bytes, bits, s.targets, hamming,
                            min(s.cfg.topk, cap), codes=codes, ends=s.view.ends, chunk=s.chunk, out=sel)
    attend_group(s.raw, s.q, s.view, s.pools, s.cfg.n_heads, s.flags, config=s.config, select=(idx, n_sel),
                 chunks=(s.chunk,), scales=s.scales, out=s.buffers["out"])


def sim_long(s: LongStage) -> None:
    """SIM: category (genre bitmask) top-k (shared categories, then recency), attention over the selected rows; with
    pool keys the genre sets of the long K pool rows picked by the indices (``LongStage.codes``)."""
    _select(s, "categories", hamming=False, codes=s.codes)


def eta_long(s: LongStage) -> None:
    """ETA: SimHash Hamming top-k (nearer, then recency), attention over the selected rows; with pool keys the
    codes of the long K pool rows picked by the indices (``LongStage.codes``)."""
    _select(s, "simhash", hamming=True, codes=s.codes)


def sdim_long(s: LongStage) -> None:
    """SDIM: per hash function the sum of the V rows in the candidate's bucket (compared in the kernel on the
    packed key bytes, or on the V router index ÷ S with keys from the index); :func:`long_output` normalises."""
    b, c, m = s.targets.shape
    keyed = s.store_cfg.pool_keys  # the buckets are the V router index's block (model.longseq.SDIM)
    part = "long.v_idx" if keyed else "keys.buckets"
    odd = s.view.group.v_shared and may_misalign(s.layout, "long.v_idx", 2)  # after int8 V codes of odd width
    bucket_sums(s.raw, s.view, s.pools[1], s.part_starts[part], _row_bytes(s.layout, part), s.cfg.sdim_bits,
                s.targets.reshape(b * c, m), c, s.flags, v_scale=s.scales[1], idx_aligned=not odd,
                key_div=s.model.key_rows if keyed else 1, chunk=s.chunk, out=s.buffers["sums"])


def twin_long(s: LongStage) -> None:
    """TWIN: per-head scores of every long row, per-head top-k (ties: later row first), softmax, values."""
    b, c, d_a = s.q.shape
    heads = s.cfg.n_heads
    wide = dict(SCORES_LAUNCH, heads_per_program=math.gcd(SCORES_LAUNCH["heads_per_program"], heads))  # divides H
    launch = dict(wide, head_loop=s.view.kv_dtype == "float32")
    scores = group_scores(s.raw, s.q, s.view, s.pools[0], heads, s.flags, scales=s.scales, chunk=s.chunk,
                          out=s.buffers["scores"], **launch)  # (B·C, H, cap)
    k = s.buffers["weights"].shape[-1]
    # equal scores rank the later row first (the model's stable sort); torch's stable sort of the flipped scores
    # took 0.12 ms of radix passes at B 512, L 1,000 on an H200, and a torch top-k over (score bits, position)
    # int64 keys longer still
    # (B·C, H, k) in position order: the softmax over each user's first min(rows, k) (its real scores), 0 after
    weights, idx = row_topk(scores, k, softmax_rows=s.view.rows, n_cand=c, ends=s.view.ends, chunk=s.chunk,
                            out=(s.buffers["weights"], s.buffers["positions"]))
    weighted_values(s.raw, s.view, s.pools[1], weights.view(b * c, heads, k), idx.view(b * c, heads, k), c,
                    d_a // heads, d_a // heads, s.flags, scales=s.scales, chunk=s.chunk,
                    out=s.buffers["out"].view(b * c, heads, d_a // heads))  # (B·C, H, dh) = (B, C, d_a)


LONG_STAGES: dict[str, Callable[[LongStage], None]] = {  # each writes its buffers for the users of s.chunk
    "sim": sim_long, "eta": eta_long, "sdim": sdim_long, "twin": twin_long,
}
