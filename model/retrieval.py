"""Long-sequence stages of the model zoo as pure tensor functions (plain math, no modules).

Layout as in :mod:`model.attention`: a padded batch of B histories of L positions, valid behaviours
first (oldest first), ``lengths`` (B,) counting them; C candidates per user.

Retrieval (the "general search unit" of SIM/ETA) returns, per (user, candidate), the positions of
the selected behaviours, ``idx`` (B, C, S) with S = min(topk, L), and how many of them are real,
``n_sel`` (B, C): entries ``idx[b, c, :n_sel[b, c]]`` are the selected behaviours (best first),
the rest are filler that attention masks. Ties are broken towards the more recent behaviour, so
every selection is deterministic.

- :func:`category_topk` (SIM hard search): behaviours sharing at least one category with the
  candidate; categories are bitmasks, more shared categories rank first, then recency;
- :func:`simhash` + :func:`hamming_topk` (ETA): SimHash signatures (signs of fixed random
  projections), the k behaviours nearest to the candidate in Hamming distance, then recency;
- :func:`sdim_aggregate` (SDIM): for each hash function, the sum of the values of behaviours whose
  bucket equals the candidate's, L2-normalised, averaged over hash functions (no top-k, no softmax);
- :func:`topk_target_attention` (TWIN): one attention score per (head, behaviour) ranks all behaviours,
  the top k per head are softmaxed (the same scores rank and weight: TWIN's consistency).
"""

from __future__ import annotations

import math

import torch

from collectivekv.model.attention import masked_softmax, valid_mask


def popcount(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Set bits of each non-negative int64 in ``x`` (only the low ``n_bits`` <= 63 bits are counted).
    Shift-and-mask arithmetic only (no lookup table, no host tensor): CUDA-graph capturable."""
    x = x & ((1 << min(n_bits, 63)) - 1)  # non-negative: the shifts below are logical
    x = x - ((x >> 1) & 0x5555555555555555)  # 2-bit counts
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)  # 4-bit counts
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F  # 8-bit counts
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def bitmask(ids: torch.Tensor, check: bool = True) -> torch.Tensor:
    """(..., G) category ids, 0 = none, 1..62 → (...) int64 bitmask with bit ``id - 1`` set per id.
    ``check``: raise on an id above 62 (one host sync); False where the ids are known to fit (serving:
    the model's item genres, checked when it was built) keeps it CUDA-graph capturable."""
    if check and ids.numel() and int(ids.max()) > 62:
        raise ValueError(f"category bitmasks hold ids 1..62, got {int(ids.max())}")
    one = torch.ones((), dtype=torch.int64, device=ids.device)
    bits = torch.where(ids > 0, one << (ids.clamp(min=1) - 1), torch.zeros_like(one))  # (..., G)
    out = torch.zeros(ids.shape[:-1], dtype=torch.int64, device=ids.device)
    for g in range(ids.shape[-1]):
        out = out | bits[..., g]
    return out


def _rank_and_select(score: torch.Tensor, eligible: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """score (B, C, L) int64 ≥ 0 (larger is better, distinct per row), eligible (B, C, L) bool →
    idx (B, C, S) positions of the best eligible behaviours first, n_sel (B, C)."""
    s = min(topk, score.shape[-1])
    ranked = torch.where(eligible, score, torch.full_like(score, -1))
    _, idx = ranked.topk(s, dim=-1, largest=True, sorted=True)  # (B, C, S)
    n_sel = eligible.sum(-1).clamp(max=s)  # (B, C)
    return idx, n_sel


def category_topk(
    behaviour_cats: torch.Tensor, target_cats: torch.Tensor, lengths: torch.Tensor, topk: int, n_bits: int = 62
) -> tuple[torch.Tensor, torch.Tensor]:
    """SIM hard search. behaviour_cats (B, L), target_cats (B, C) int64 category bitmasks.

    Eligible: valid behaviours sharing >= 1 category with the candidate. Rank: shared categories
    (more first), then position (later first). Returns idx (B, C, S), n_sel (B, C).
    """
    seq = behaviour_cats.shape[1]
    shared = popcount(behaviour_cats.unsqueeze(1) & target_cats.unsqueeze(2), n_bits)  # (B, C, L)
    eligible = (shared > 0) & valid_mask(lengths, seq).unsqueeze(1)  # (B, C, L)
    pos = torch.arange(seq, device=behaviour_cats.device)  # (L,)
    return _rank_and_select(shared * seq + pos, eligible, topk)


def genre_blocks(item_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct genre sets of the items and each item's block: ``item_keys`` (n_items + 1,) int64 bitmasks
    (row 0, the padding item, left out of the sets) → (sets (P,) ascending, block (n_items + 1,) int64 in 0..P-1;
    the padding item's block is 0). SIM keyed by its pool rows gives each set a block of index values."""
    sets = torch.unique(item_keys[1:]) if item_keys.numel() > 1 else item_keys.new_zeros(1)  # (P,) ascending
    block = torch.searchsorted(sets, item_keys).clamp(max=sets.numel() - 1)  # (n_items + 1,)
    block[0] = 0
    return sets, block


def simhash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """SimHash codes: (..., E) vectors, (E, bits) hyperplanes (bits <= 62) → (...) int64 whose bit j
    is 1 where ``x · planes[:, j] > 0``."""
    bits = (x @ planes.to(x.dtype)) > 0  # (..., bits)
    weights = torch.ones((), dtype=torch.int64, device=x.device) << torch.arange(planes.shape[1], device=x.device)
    return (bits.to(torch.int64) * weights).sum(-1)


def hamming_topk(
    behaviour_codes: torch.Tensor, target_codes: torch.Tensor, lengths: torch.Tensor, topk: int, n_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ETA retrieval. behaviour_codes (B, L), target_codes (B, C) int64 SimHash codes of ``n_bits``.

    Every valid behaviour is eligible; rank: Hamming distance (smaller first), then position
    (later first). Returns idx (B, C, S), n_sel (B, C).
    """
    seq = behaviour_codes.shape[1]
    dist = popcount(behaviour_codes.unsqueeze(1) ^ target_codes.unsqueeze(2), n_bits)  # (B, C, L)
    pos = torch.arange(seq, device=behaviour_codes.device)
    eligible = valid_mask(lengths, seq).unsqueeze(1).expand_as(dist)
    return _rank_and_select((n_bits - dist) * seq + pos, eligible, topk)


def gather_positions(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) at positions idx (B, C, S) → (B, C, S, ...)."""
    rows = torch.arange(x.shape[0], device=x.device).reshape(-1, 1, 1)  # (B, 1, 1)
    return x[rows, idx]


def bucket_codes(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """(..., E) vectors, planes (E, m, bits) → (...) int64: the m buckets packed, hash h at bits h·bits .."""
    e, m, bits = planes.shape
    return simhash(x, planes.reshape(e, m * bits))


def unpack_buckets(codes: torch.Tensor, m: int, bits: int) -> torch.Tensor:
    """(...) packed bucket codes (:func:`bucket_codes`) → (..., m) int64 bucket of each hash function."""
    shifts = torch.arange(m, device=codes.device) * bits  # (m,)
    return (codes.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., m)


def sdim_buckets(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """(..., E) vectors, planes (E, m, bits) → (..., m) int64 bucket of each of the m hash functions."""
    _, m, bits = planes.shape
    return unpack_buckets(bucket_codes(x, planes), m, bits)


def sdim_aggregate(
    v: torch.Tensor, behaviour_buckets: torch.Tensor, target_buckets: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """SDIM's sampling-based interest: v (B, L, d) values, behaviour_buckets (B, L, m), target_buckets
    (B, C, m) → (B, C, d) = mean over hash functions of L2-normalise(sum of v where buckets collide).
    No collision → that hash function contributes 0."""
    valid = valid_mask(lengths, v.shape[1])  # (B, L)
    collide = (behaviour_buckets.unsqueeze(1) == target_buckets.unsqueeze(2)) & valid[:, None, :, None]  # (B,C,L,m)
    sums = torch.einsum("bclm,bld->bcmd", collide.to(v.dtype), v)  # (B, C, m, d)
    return torch.nn.functional.normalize(sums, dim=-1).mean(dim=2)  # (B, C, d)


def topk_target_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, n_heads: int, topk: int
) -> torch.Tensor:
    """TWIN's consistency-preserved target attention: q (B, C, d_a), k, v (B, L, d_a) → (B, C, d_a).

    Per head, scores q·k/√d_h over the valid behaviours; the ``topk`` highest are softmaxed and
    weight their values (the same scores rank and weight). Equal scores rank the more recent
    behaviour first (a stable sort, as ETA's ranking), so the selection does not depend on the
    batch's padding width or the device: with CollectiveKV, behaviours routed to the same pool row
    tie exactly in the heads that hold no user dimensions. Empty history → zeros.
    """
    b, c, d_a = q.shape
    seq = k.shape[1]
    dh = d_a // n_heads
    qh = q.reshape(b, c, n_heads, dh)
    kh = k.reshape(b, seq, n_heads, dh)
    vh = v.reshape(b, seq, n_heads, dh)
    scores = torch.einsum("bchd,blhd->bchl", qh, kh) / math.sqrt(dh)  # (B, C, H, L)
    valid = valid_mask(lengths, seq)[:, None, None, :]  # (B, 1, 1, L)
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    s = min(topk, seq)
    # descending by score, ties → later position first: stable sort of the reversed sequence
    top, rev = scores.flip(-1).sort(dim=-1, descending=True, stable=True)  # (B, C, H, L)
    top, idx = top[..., :s], seq - 1 - rev[..., :s]  # (B, C, H, S)
    n_sel = lengths.clamp(max=s)  # (B,) valid entries come first: every valid score > finfo.min
    weights = masked_softmax(top, n_sel)  # (B, C, H, S)
    vsel = torch.gather(
        vh.permute(0, 2, 1, 3).unsqueeze(1).expand(b, c, n_heads, seq, dh), 3,
        idx.unsqueeze(-1).expand(b, c, n_heads, s, dh),
    )  # (B, C, H, S, dh)  # fmt: skip
    out = torch.einsum("bchs,bchsd->bchd", weights, vsel)  # (B, C, H, dh)
    return out.reshape(b, c, d_a)
