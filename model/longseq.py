"""Long-history target-attention CTR models: SIM, ETA, SDIM and TWIN, each with a full or a
CollectiveKV K/V (``cfg.kv_mode``), split into prefill (history → :class:`ZooCache`) and decode.

The structure follows reczoo LongCTR's implementations (read, not copied): the candidate ``t``
(item + genre embedding) drives

- a **short-sequence** multi-head target attention over the last ``cfg.max_len`` behaviours
  (``short``: Q/K/V projections of its own), and
- a **long-sequence** stage over the last ``cfg.long_len`` behaviours (``long``: its own projections):
  a retrieval step picks behaviours for the candidate and an attention (or aggregation) reads them,

and an MLP scores ``[short interest, long interest, t]``. Behaviour tokens are item + genre +
feedback embeddings (as in :class:`model.ctr.TargetAttentionCTR`). As in the authors' code the
short attention's K/V are CollectiveKV; here the long stage's cached K/V (or V) are CollectiveKV too
(same d_u, pool size and sharing flags; pools are separate).

What each model caches per user (``ZooCache``; n = behaviours in the long window, n_s = min(n, max_len)):

====  =============================================================  =================================
SIM   short K/V (n_s) + long K/V (n) + each behaviour's category      category search (hard): shared
      bitmask (its genre set), ``keys["categories"]``                 genres, then recency; top-k
ETA   short K/V (n_s) + long K/V (n) + SimHash signature (hash_bits)  Hamming top-k, then recency
      of each behaviour's item embedding, ``keys["simhash"]``
SDIM  short K/V (n_s) + long **V only** (n) + sdim_hashes bucket ids  bucket collisions, no K, no top-k
      of sdim_bits each, ``keys["buckets"]``
TWIN  short K/V (n_s) + long K/V (n)                                  per-head top-k of the attention
                                                                      scores themselves
====  =============================================================  =================================

In the collective variant every cached K/V is its user-specific part (d_u dims) + a pool index.
Retrieval keys are computed from the (trained) item embedding at prefill, so serving never needs
the behaviours' embeddings again — or, ``cfg.pool_keys`` (SIM, ETA, SDIM), they are functions of the long router
index and not cached at all (SDIM's long V is then its pool row alone: no user part).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from collectivekv.model.attention import tail_window
from collectivekv.model.blocks import TABlock, ZooBase, ZooCache, add_losses, trim
from collectivekv.model.cache_spec import key_bits, key_blocks, long_v_user
from collectivekv.model.config import ModelConfig
from collectivekv.model.ctr import RouterLosses, build_mlp, distinct, mlp_head
from collectivekv.model.pool import TokenBatch, block_rows
from collectivekv.model.retrieval import (
    bitmask,
    bucket_codes,
    category_topk,
    genre_blocks,
    hamming_topk,
    sdim_aggregate,
    sdim_buckets,
    simhash,
    unpack_buckets,
)

_PLANES_SEED = 2601_19178  # fixed: the random hyperplanes are part of the model (saved as a buffer)


class LongSequenceCTR(ZooBase):
    """Short target attention + a long-sequence stage; subclasses define the long stage."""

    long_has_k = True
    key_name = ""  # SIM / ETA / SDIM: the name of the per-behaviour retrieval key in ``ZooCache.keys``

    def __init__(self, cfg: ModelConfig, item_genres: torch.Tensor | None = None, blocks: int = 1) -> None:
        super().__init__(cfg, item_genres)
        self.short = TABlock(cfg, blocks=blocks)
        self.long = TABlock(cfg, has_k=self.long_has_k, blocks=blocks, v_user=long_v_user(cfg))
        self.blocks = blocks  # index blocks of every pool (:func:`model.pool.block_table`; SIM / SDIM keyed by it)
        self.key_rows = block_rows(cfg.collective.pool_size, blocks)  # S: index values (shared rows) per block
        self.mlp = build_mlp(cfg.embed_dim + 2 * cfg.d_attn, cfg.mlp_dims, cfg.dropout)

    # ------------------------------------------------------------------ hooks for the subclasses
    def retrieval_keys(self, items: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-behaviour retrieval keys of the (B, L) window (0 at padding)."""
        return {}

    def long_interest(self, t: torch.Tensor, targets: torch.Tensor, cache: ZooCache) -> torch.Tensor:
        """(B, C, E) candidates → (B, C, d_a) long-sequence interest."""
        raise NotImplementedError

    def pool_codes(self) -> torch.Tensor:
        """(M,) int64 retrieval key of each long K pool row (``cfg.pool_keys``: SIM, ETA)."""
        raise NotImplementedError

    def row_offsets(self, items: torch.Tensor) -> torch.Tensor:
        """(U,) items → the first index of each item's block (blocked pools: SIM, SDIM keyed by their index)."""
        raise NotImplementedError

    def behaviour_tokens(self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor) -> TokenBatch:
        tokens = super().behaviour_tokens(items, feedback, lengths)
        if self.blocks == 1:
            return tokens
        assert tokens.items is not None
        return replace(tokens, row_offset=self.row_offsets(tokens.items))

    def behaviour_codes(self, cache: ZooCache) -> torch.Tensor:
        """(B, L) int64 retrieval keys of the cached behaviours (0 at padding): the cached keys where the cache
        holds them (item keys; a full-KV store of a model keyed by its pool rows, :func:`model.entry.full_cache`),
        else the key of the long K pool row each behaviour's router index names (:meth:`pool_codes`)."""
        if self.key_name in cache.keys:
            return cache.keys[self.key_name]
        codes = self.pool_codes()
        idx = cache.kv["long"].k_idx.clamp(0, codes.shape[0] - 1)  # (B, L); padding and bad rows masked below
        return torch.where(self._valid(cache.lengths, idx.shape[1]), codes[idx], 0)

    # ---------------------------------------------------------------------------- prefill/decode
    def prefill_with_losses(
        self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[ZooCache, RouterLosses]:
        self._check_history(items, feedback, lengths)
        if items.shape[1] > self.cfg.long_len:
            items, feedback, lengths = tail_window(items, feedback, lengths, self.cfg.long_len)
        items, feedback = trim(items, feedback, lengths)
        soft = self.training
        long_cache, long_losses = self.long.prefill(self.behaviour_tokens(items, feedback, lengths), lengths, soft)
        s_items, s_feedback, s_lengths = tail_window(items, feedback, lengths, self.cfg.max_len)
        short_cache, short_losses = self.short.prefill(
            self.behaviour_tokens(s_items, s_feedback, s_lengths), s_lengths, soft
        )
        with torch.no_grad():
            keys = self.retrieval_keys(items, lengths)
        cache = ZooCache(lengths=lengths, kv={"short": short_cache, "long": long_cache}, keys=keys)
        return cache, add_losses(short_losses, long_losses)

    def decode_with_losses(self, cache: ZooCache, targets: torch.Tensor) -> tuple[torch.Tensor, RouterLosses]:
        squeeze = targets.dim() == 1
        tgt = targets.unsqueeze(1) if squeeze else targets  # (B, C)
        t = self.item_embedding(tgt)  # (B, C, E)
        short = self.short.attend(t, cache.kv["short"])  # (B, C, d_a)
        long = self.long_interest(t, tgt, cache)  # (B, C, d_a)
        logits = mlp_head(self.mlp, [short, long, t])  # (B, C)
        return (logits.squeeze(1) if squeeze else logits), self.zero_losses(logits)

    def keys_values(self, cache: ZooCache) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"short": self.short.keys_values(cache.kv["short"]), "long": self.long.keys_values(cache.kv["long"])}

    # ----------------------------------------------------------------------------------- helpers
    def item_vectors(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item embeddings of the distinct items of a (B, L) window: (U, E) vectors and the (B, L)
        row of each position (padding → row of item 0, masked by the caller)."""
        uniq, inverse, _ = distinct(items.reshape(-1), self.cfg.n_items + 1)
        return self.item_embedding(uniq), inverse.reshape(items.shape)

    def _valid(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class SIM(LongSequenceCTR):
    """SIM with hard (category) search: the long stage attends over the ``topk`` most recent
    behaviours sharing the most categories (genres) with the candidate.

    Caches: short K/V (last max_len), long K/V (long window) and a category bitmask per behaviour
    (``keys["categories"]``, bit g-1 for genre g; needs n_genres <= 62). With ``cfg.pool_keys`` the router index
    carries the genre set: every pool's ``pool_size`` index values form one block per distinct genre set of the
    items (:func:`model.retrieval.genre_blocks`), each block reading the same S = pool_size // sets shared rows
    (:func:`model.pool.block_table`); a behaviour routes freely over the S rows and its index is its set's block
    start + the row. The key is then a function of the index (``row_categories``): no key is cached, and the
    retrieval is the item-keyed one.
    """

    key_name = "categories"

    def __init__(self, cfg: ModelConfig, item_genres: torch.Tensor | None = None) -> None:
        if cfg.n_genres > 62:
            raise ValueError(f"SIM's category bitmasks hold at most 62 categories, got n_genres {cfg.n_genres}")
        if not cfg.pool_keys:
            super().__init__(cfg, item_genres)
            return
        genres = torch.zeros(cfg.n_items + 1, cfg.max_genres, dtype=torch.long) if item_genres is None else item_genres
        sets, block = genre_blocks(bitmask(genres.long()))  # (P,), (n_items + 1,)
        super().__init__(cfg, item_genres, sets.numel())
        self.register_buffer("item_block_start", block * self.key_rows)  # (n_items + 1,) its block's first index
        keys = sets.repeat_interleave(self.key_rows)  # (P·S,) the genre set each index value names
        pad = keys.new_zeros(cfg.collective.pool_size - keys.numel())  # index values past the blocks: no genre
        self.register_buffer("row_categories", torch.cat([keys, pad]))  # (M,)

    def categories(self, items: torch.Tensor, check: bool = True) -> torch.Tensor:
        return bitmask(self.item_genres[items], check=check)

    def row_offsets(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_block_start[items]

    def retrieval_keys(self, items: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.pool_keys:
            return {}
        cats = torch.where(self._valid(lengths, items.shape[1]), self.categories(items), 0)
        return {"categories": cats}

    def pool_codes(self) -> torch.Tensor:
        return self.row_categories

    def retrieve(self, cache: ZooCache, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return category_topk(self.behaviour_codes(cache), self.categories(targets), cache.lengths, self.cfg.topk,
                             key_bits(self.cfg))

    def long_interest(self, t: torch.Tensor, targets: torch.Tensor, cache: ZooCache) -> torch.Tensor:
        idx, n_sel = self.retrieve(cache, targets)
        return self.long.attend_at(t, cache.kv["long"], idx, n_sel)


class ETA(LongSequenceCTR):
    """ETA: SimHash (``hash_bits`` fixed random hyperplanes over the item embedding) of every
    behaviour and of the candidate; the long stage attends over the ``topk`` behaviours nearest in
    Hamming distance (ties: more recent first).

    Caches: short K/V, long K/V and each behaviour's signature (``keys["simhash"]``, int64 holding
    hash_bits bits). With ``cfg.pool_keys`` the hyperplanes span the long K's collective dims and sign
    the pool row each behaviour's router picked (a function of its cached index: no key is cached) against
    the candidate's long query in the same dims (:meth:`pool_codes`, :meth:`target_codes`).
    """

    key_name = "simhash"

    def __init__(self, cfg: ModelConfig, item_genres: torch.Tensor | None = None) -> None:
        super().__init__(cfg, item_genres)
        g = torch.Generator().manual_seed(_PLANES_SEED)
        dim = cfg.d_attn - cfg.collective.d_user if cfg.pool_keys else cfg.embed_dim
        self.register_buffer("hash_planes", torch.randn(dim, cfg.hash_bits, generator=g))

    def retrieval_keys(self, items: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.pool_keys:
            return {}
        vectors, rows = self.item_vectors(items, lengths)
        codes = simhash(vectors, self.hash_planes)[rows]  # (B, L)
        return {"simhash": torch.where(self._valid(lengths, items.shape[1]), codes, 0)}

    def pool_codes(self) -> torch.Tensor:
        """(M,) int64 SimHash codes of the long K pool's rows (``cfg.pool_keys``)."""
        return simhash(self.long.k_branch.collective_pool().detach(), self.hash_planes)

    def target_codes(self, t: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) int64 codes of the candidates t (B, C, E): of t, or of the collective dims of their long query
        (``q``, (B, C, d_a), when already computed)."""
        if self.cfg.pool_keys:
            q = self.long.query(t) if q is None else q
            return simhash(q.detach()[..., self.cfg.collective.d_user :], self.hash_planes)
        return simhash(t.detach(), self.hash_planes)

    def retrieve(self, cache: ZooCache, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hamming_topk(self.behaviour_codes(cache), self.target_codes(t), cache.lengths, self.cfg.topk,
                            self.cfg.hash_bits)

    def long_interest(self, t: torch.Tensor, targets: torch.Tensor, cache: ZooCache) -> torch.Tensor:
        idx, n_sel = self.retrieve(cache, t)
        return self.long.attend_at(t, cache.kv["long"], idx, n_sel)


class SDIM(LongSequenceCTR):
    """SDIM: ``sdim_hashes`` SimHash functions of ``sdim_bits`` bits bucket every behaviour and the
    candidate; the long interest is the mean over hash functions of the L2-normalised sum of the
    values of the behaviours in the candidate's bucket. The long stage has values only (no K, no Q).

    Caches: short K/V, long V and each behaviour's bucket ids (``keys["buckets"]``, (B, L, m)). With
    ``cfg.pool_keys`` the router index carries the buckets: the ``pool_size`` index values form one block per
    bucket code (the m buckets packed, 2^(m·bits) codes, :func:`model.cache_spec.key_blocks`) over S shared rows
    (:func:`model.pool.block_table`), each behaviour's index is its item's code · S + the row its router picked, and
    the long V is that pool row alone (no user part): 2 bytes per long behaviour, nothing else cached for it.
    """

    long_has_k = False
    key_name = "buckets"

    def __init__(self, cfg: ModelConfig, item_genres: torch.Tensor | None = None) -> None:
        super().__init__(cfg, item_genres, key_blocks(cfg))
        g = torch.Generator().manual_seed(_PLANES_SEED)
        planes = torch.randn(cfg.embed_dim, cfg.sdim_hashes, cfg.sdim_bits, generator=g)
        self.register_buffer("hash_planes", planes)

    def row_offsets(self, items: torch.Tensor) -> torch.Tensor:
        return bucket_codes(self.item_embedding(items).detach(), self.hash_planes) * self.key_rows  # code · S

    def retrieval_keys(self, items: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.pool_keys:
            return {}
        vectors, rows = self.item_vectors(items, lengths)
        buckets = sdim_buckets(vectors, self.hash_planes)[rows]  # (B, L, m)
        return {"buckets": torch.where(self._valid(lengths, items.shape[1]).unsqueeze(-1), buckets, 0)}

    def behaviour_codes(self, cache: ZooCache) -> torch.Tensor:
        """(B, L, m) bucket ids of the cached behaviours (0 at padding): the cached keys, or those the long V
        router index carries (its block: the packed bucket code)."""
        if self.key_name in cache.keys:
            return cache.keys[self.key_name]
        _, m, bits = self.hash_planes.shape
        code = cache.kv["long"].v_idx // self.key_rows  # (B, L) the block: the packed bucket code
        return torch.where(self._valid(cache.lengths, code.shape[1]).unsqueeze(-1), unpack_buckets(code, m, bits), 0)

    def long_interest(self, t: torch.Tensor, targets: torch.Tensor, cache: ZooCache) -> torch.Tensor:
        _, v = self.long.keys_values(cache.kv["long"])  # (B, L, d_a)
        buckets = sdim_buckets(t.detach(), self.hash_planes)  # (B, C, m)
        return sdim_aggregate(v.to(t.dtype), self.behaviour_codes(cache), buckets, cache.lengths)


class TWIN(LongSequenceCTR):
    """TWIN: the long stage scores every behaviour with its own attention (Q·K per head), keeps the
    ``topk`` per head and softmaxes those same scores (consistent two-stage search).

    Caches: short K/V and long K/V (no retrieval keys: the K are the retrieval keys).
    """

    def long_interest(self, t: torch.Tensor, targets: torch.Tensor, cache: ZooCache) -> torch.Tensor:
        return self.long.attend_topk(t, cache.kv["long"], self.cfg.topk)
