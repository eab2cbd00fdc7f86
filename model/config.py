"""Frozen configurations of the CTR models and their CollectiveKV variants.

One dataclass per component; derive variants with :func:`dataclasses.replace`, e.g.
``replace(cfg, kv_mode="full")`` or ``replace(cfg, collective=replace(cfg.collective, d_user=4))``.
Configs round-trip through plain JSON dicts (:func:`config_to_dict` / :func:`config_from_dict`),
which is what checkpoints store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from collectivekv.model.events import check_features, n_feedback

KVMode = Literal["full", "collective"]
Arch = Literal["din", "sim", "eta", "sdim", "twin", "hstu"]
ARCHS: tuple[str, ...] = ("din", "sim", "eta", "sdim", "twin", "hstu")
LONG_ARCHS: tuple[str, ...] = ("sim", "eta", "sdim", "twin")  # short + long-sequence target attention

# Model-zoo fields (added after the first checkpoints were written): config_to_dict leaves them out
# while they hold their defaults, so an existing config dict, and the model version fingerprinted
# from it, stays byte-for-byte the same. Never change these defaults.
ZOO_DEFAULTS: dict[str, Any] = {
    "arch": "din",
    "long_len": 1000,
    "topk": 50,
    "hash_bits": 16,
    "sdim_hashes": 4,
    "sdim_bits": 4,
    "hstu_layers": 2,
}
# Per-event feature fields (model/events.py), left out the same way at their defaults. Never change these defaults.
EVENT_DEFAULTS: dict[str, Any] = {"event_features": (), "gap_buckets": 16, "event_time_unit": "s"}
# Cache-layout fields ("half the cache": one router index shared by K and V, int8 user parts), left out the same
# way at their defaults. Never change these defaults.
CACHE_DEFAULTS: dict[str, Any] = {"kv_index": "separate", "user_dtype": "float", "retrieval_keys": "item"}
KV_INDEXES: tuple[str, ...] = ("separate", "joint")
USER_DTYPES: tuple[str, ...] = ("float", "int8")
RETRIEVAL_KEYS: tuple[str, ...] = ("item", "pool")


@dataclass(frozen=True)
class CollectiveConfig:
    """The CollectiveKV part of a model (ignored when ``kv_mode == "full"``).

    ``d_user`` counts against the whole attention dim ``d_attn`` (before the split into heads):
    a shared K has ``d_user`` user-specific dims and ``d_attn - d_user`` collective dims gathered
    from the global pool. A K (or V) that is not shared is a plain ``d_attn``-dim projection and
    is cached whole.
    """

    d_user: int = 1
    pool_size: int = 10_000
    share_k: bool = True
    share_v: bool = True
    peak_weight: float = 0.01
    balance_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.d_user < 1:
            raise ValueError(f"collective.d_user must be >= 1, got {self.d_user}")
        if self.pool_size < 1:
            raise ValueError(f"collective.pool_size must be >= 1, got {self.pool_size}")
        if self.peak_weight < 0 or self.balance_weight < 0:
            raise ValueError("collective loss weights must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """A DIN/SIM-style target-attention CTR model.

    Behaviour token = item embedding + mean genre embedding + feedback embedding (the event's
    label: 1 = negative, 2 = positive, 0 = padding). Target token = item + mean genre embedding.
    Attention: Q from the target, K/V from the last ``max_len`` behaviours, ``n_heads`` heads
    over ``d_attn`` dims; MLP over [attention output, target embedding].
    """

    n_items: int
    n_genres: int = 0
    max_genres: int = 1
    embed_dim: int = 64
    d_attn: int = 256
    n_heads: int = 8
    max_len: int = 50
    mlp_dims: tuple[int, ...] = (200, 80)
    dropout: float = 0.0
    kv_mode: KVMode = "collective"
    collective: CollectiveConfig = field(default_factory=CollectiveConfig)
    # model zoo (model/zoo.py); "din" is TargetAttentionCTR and ignores the fields below
    arch: Arch = "din"
    long_len: int = 1000  # sim/eta/sdim/twin: behaviours in the long window (max_len = the short window)
    topk: int = 50  # sim/eta/twin: behaviours the retrieval stage passes to the long attention
    hash_bits: int = 16  # eta: SimHash signature bits
    sdim_hashes: int = 4  # sdim: hash functions
    sdim_bits: int = 4  # sdim: bits per hash function (2^bits buckets)
    hstu_layers: int = 2  # hstu: self-attention layers (max_len = the sequence window)
    # per-event features in the behaviour token (model/events.py): "gap" (log-bucketed time since the user's
    # previous event), "hour" (UTC hour of day); their code rides in the feedback id
    event_features: tuple[str, ...] = ()
    gap_buckets: int = 16
    event_time_unit: str = "s"  # the unit of the histories' timestamps (the dataset's meta.json)
    # cache layout (model/cache_spec.py): "joint" = one router index per behaviour into one pool holding the
    # collective K and V parts (every group with a K; both sides must be shared); "int8" = the user parts of the
    # shared sides are fake-quantised in training and cached as int8 codes with a per-branch scale (model/quant.py)
    kv_index: str = "separate"
    user_dtype: str = "float"
    # sim / eta / sdim: where a behaviour's retrieval key comes from — "item": its item (a cached key per
    # behaviour); "pool": its long router index (nothing cached: the key is a function of the index). SIM / SDIM:
    # the index values form a block per genre set / bucket code over shared rows (model.longseq.SIM, SDIM; SDIM's
    # long V is then the pool row alone); ETA: SimHash of the pool row against the candidate's long query. A full
    # model, or one whose long K (SDIM: V) is not shared: "item".
    retrieval_keys: str = "item"

    def __post_init__(self) -> None:
        object.__setattr__(self, "event_features", tuple(self.event_features))
        check_features(self.event_features, self.gap_buckets, self.event_time_unit)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch in LONG_ARCHS:
            if not 1 <= self.long_len <= 4096:
                raise ValueError(f"long_len must be in [1, 4096], got {self.long_len}")
            if self.max_len > self.long_len:
                raise ValueError(f"max_len {self.max_len} (short window) must be <= long_len {self.long_len}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if not 1 <= self.hash_bits <= 62:
            raise ValueError(f"hash_bits must be in [1, 62], got {self.hash_bits}")
        if self.sdim_hashes < 1 or not 1 <= self.sdim_bits <= 30:
            raise ValueError(f"sdim_hashes must be >= 1 and sdim_bits in [1, 30], got {self.sdim_hashes}, "
                             f"{self.sdim_bits}")  # fmt: skip
        if self.arch == "sdim" and self.sdim_hashes * self.sdim_bits > 63:  # a behaviour's codes: one cached int64
            raise ValueError(f"sdim_hashes x sdim_bits must be <= 63 (the bucket codes of a behaviour are cached in "
                             f"one 63-bit key), got {self.sdim_hashes} x {self.sdim_bits}")
        if self.hstu_layers < 1:
            raise ValueError(f"hstu_layers must be >= 1, got {self.hstu_layers}")
        if self.kv_mode not in ("full", "collective"):
            raise ValueError(f"kv_mode must be 'full' or 'collective', got {self.kv_mode!r}")
        for name in ("n_heads", "embed_dim", "d_attn", "max_genres"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_genres < 0:
            raise ValueError(f"n_genres must be >= 0, got {self.n_genres}")
        if self.arch == "sim" and self.n_genres > 62:  # (its category bitmasks: one bit per genre in an int64)
            raise ValueError(f"SIM's category bitmasks hold at most 62 categories, got n_genres {self.n_genres}")
        if self.d_attn % self.n_heads:
            raise ValueError(f"d_attn {self.d_attn} is not divisible by n_heads {self.n_heads}")
        if not 1 <= self.max_len <= 4096:
            raise ValueError(f"max_len must be in [1, 4096], got {self.max_len}")
        if self.kv_mode == "collective" and self.collective.d_user >= self.d_attn:
            raise ValueError(f"collective.d_user {self.collective.d_user} must be < d_attn {self.d_attn}")
        if self.n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {self.n_items}")
        if self.kv_index not in KV_INDEXES:
            raise ValueError(f"kv_index must be one of {KV_INDEXES}, got {self.kv_index!r}")
        if self.user_dtype not in USER_DTYPES:
            raise ValueError(f"user_dtype must be one of {USER_DTYPES}, got {self.user_dtype!r}")
        if self.retrieval_keys not in RETRIEVAL_KEYS:
            raise ValueError(f"retrieval_keys must be one of {RETRIEVAL_KEYS}, got {self.retrieval_keys!r}")
        codes = 1 << (self.sdim_hashes * self.sdim_bits)
        if self.arch == "sdim" and self.pool_keys and codes > self.collective.pool_size:
            raise ValueError(f"SDIM keyed by its router index needs a block of index values per bucket code: "
                             f"2^(sdim_hashes · sdim_bits) = {codes} codes > pool_size {self.collective.pool_size} "
                             "(lower --sdim-hashes / --sdim-bits, or raise --pool-size up to 65,536)")
        if self.kv_index == "joint" and self.kv_mode == "collective" and not (
                self.collective.share_k and self.collective.share_v):
            raise ValueError("kv_index 'joint' needs both K and V shared (collective.share_k and share_v)")

    @property
    def window_len(self) -> int:
        """Behaviours of history the model reads: ``long_len`` for sim/eta/sdim/twin, else ``max_len``."""
        return self.long_len if self.arch in LONG_ARCHS else self.max_len

    @property
    def n_feedback(self) -> int:
        """The feedback vocabulary: padding + (negative, positive) × event codes (3 without event features)."""
        return n_feedback(self.event_features, self.gap_buckets)

    @property
    def k_shared(self) -> bool:
        return self.kv_mode == "collective" and self.collective.share_k

    @property
    def v_shared(self) -> bool:
        return self.kv_mode == "collective" and self.collective.share_v

    @property
    def joint_index(self) -> bool:
        """One router index per behaviour for K and V (``kv_index == "joint"`` in a collective model)."""
        return self.kv_index == "joint" and self.k_shared and self.v_shared

    @property
    def pool_keys(self) -> bool:
        """SIM's / ETA's / SDIM's retrieval keys are functions of the long router index (``retrieval_keys == "pool"``
        with a shared long K; SDIM: V): no cached retrieval key."""
        shared = self.v_shared if self.arch == "sdim" else self.k_shared
        return self.arch in ("sim", "eta", "sdim") and self.retrieval_keys == "pool" and shared

    @property
    def int8_user(self) -> bool:
        """The shared sides' user parts are int8 codes × a per-branch scale (``user_dtype == "int8"``)."""
        return self.user_dtype == "int8" and self.kv_mode == "collective"

    @property
    def dk_user(self) -> int:
        """Per-behaviour dims of the cached (user-specific) K."""
        return self.collective.d_user if self.k_shared else self.d_attn

    @property
    def dv_user(self) -> int:
        """Per-behaviour dims of the cached (user-specific) V."""
        return self.collective.d_user if self.v_shared else self.d_attn


def with_sharing(cfg: ModelConfig, share_k: bool, share_v: bool) -> ModelConfig:
    """``cfg`` with these shared sides (collective mode); a joint index needs both, so it falls back to separate
    indices when one side is not shared (the sharing sweeps of ``ckv eval`` / ``ckv experiment``)."""
    kv_index = cfg.kv_index if share_k and share_v else "separate"
    coll = dataclasses.replace(cfg.collective, share_k=share_k, share_v=share_v)
    return dataclasses.replace(cfg, kv_mode="collective", collective=coll, kv_index=kv_index)


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists). Fields added after the first checkpoints are left out at their
    defaults (:data:`ZOO_DEFAULTS`, :data:`EVENT_DEFAULTS`, :data:`CACHE_DEFAULTS`), so configs written before
    them round-trip unchanged; :data:`CACHE_DEFAULTS`' fields are left out of a full model's, which they do not
    change (it reads back with the defaults), and ``retrieval_keys`` out of every model it does not change."""
    d = dataclasses.asdict(cfg)
    for key, default in (*ZOO_DEFAULTS.items(), *EVENT_DEFAULTS.items(), *CACHE_DEFAULTS.items()):
        if d[key] == default or (key in CACHE_DEFAULTS and cfg.kv_mode == "full"):  # a full model caches no
            del d[key]  # router index or user part: kv_index / user_dtype do not change it, nor its run id
        elif key == "retrieval_keys" and not cfg.pool_keys:
            del d[key]  # only SIM / ETA / SDIM with a shared long K (SDIM: V) read it
    if "event_features" in d:
        d["event_features"] = list(d["event_features"])
    return d


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown keys are an error, missing zoo keys take their
    defaults (so dicts written before the zoo existed load)."""
    d = dict(d)
    coll = CollectiveConfig(**d.pop("collective", {}))
    for key in ("mlp_dims", "event_features"):
        if key in d:
            d[key] = tuple(d[key])
    return ModelConfig(collective=coll, **d)
