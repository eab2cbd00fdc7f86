"""Serving settings in one frozen value: what a :class:`cachestore.decode.runtime.DecodeRuntime` is built with.

``ServingConfig`` is the single source of the serving knobs. The CLI (``jobs/serving_options.py``) turns
its options into one, the HTTP server keeps one per loaded store version, and tests derive variants with
:func:`dataclasses.replace` (or ``ServingConfig().replace(batch_users=4)``). Nothing here touches a device.

Fields (defaults in brackets):

    device       "cuda" | "cpu" | "cuda:N" | None  [None: CUDA when available, else CPU]
    path         attention path: "auto" | "fused" | "poolscore" | "gather"  [auto]
    batch_users  users per fetch / transfer / decode step  [512]
    max_pairs    at most this many (user, candidate) pairs per step  [8192]
    pad_to       pad every step to this history length (static shapes)  [None: the batch's longest]
    graphs       decode each step by replaying a CUDA graph (CUDA, every model)  [False]
    zero_copy    with graphs: the graph gathers the records from the LMDB map  [False]
    verify_crc   CRC-check every record fetched from LMDB (the resident tier's misses too) before scoring it  [False]
    tier_bytes   bytes of records the resident tier holds (:mod:`cachestore.tier`; its arena adds a request area
                 of batch_users × 16 B + one zero record, and when the store does not fit a staging area of
                 batch_users records): None = auto (on CUDA the whole store when it fits in 80% of the free
                 device memory, else that 80%; on CPU off), 0 = off  [None]
    tier_share   the share of that auto budget this runtime may take: 1/k when k serving processes start on
                 one device (``ckv serve --workers``; each starts after the previous one has loaded)  [1.0]
    policy       the tier's eviction policy when the store does not fit: "lru" | "s3fifo"  [s3fifo]
    fused_config launch settings of the fused kernel (:class:`cachestore.decode.fused.FusedConfig`)
    n_buffers    host buffers in the fetch ring  [2]
    pin          pinned host buffers  [None: when the device is CUDA]
    shards       the shards of a sharded store version to serve (:mod:`cachestore.decode.sharded`)  [None: all]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from collectivekv.cachestore.decode.fused import DEFAULT_FUSED, FusedConfig

POLICIES = ("lru", "s3fifo")
DECODE_PATHS = ("auto", "fused", "poolscore", "gather")


@dataclass(frozen=True)
class ServingConfig:
    """How a runtime serves one store version (see the module docstring for every field)."""

    device: str | None = None
    path: str = "auto"
    batch_users: int = 512
    max_pairs: int = 8192
    pad_to: int | None = None
    graphs: bool = False
    zero_copy: bool = False
    verify_crc: bool = False
    tier_bytes: int | None = None
    tier_share: float = 1.0
    policy: str = "s3fifo"
    fused_config: FusedConfig = field(default=DEFAULT_FUSED)
    n_buffers: int = 2
    pin: bool | None = None
    shards: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):  # accept torch.device, store its string
            object.__setattr__(self, "device", str(self.device))
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"device must be cpu, cuda or cuda:N (or None: CUDA when available), got "
                                 f"{self.device!r}") from exc
        if self.path not in DECODE_PATHS:
            raise ValueError(f"path must be one of {DECODE_PATHS}, got {self.path!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("batch_users", "max_pairs", "n_buffers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pad_to is not None and self.pad_to < 1:
            raise ValueError(f"pad_to must be >= 1 or None, got {self.pad_to}")
        if self.tier_bytes is not None and self.tier_bytes < 0:
            raise ValueError(f"tier_bytes must be >= 0 (0 = off) or None (auto), got {self.tier_bytes}")
        if not 0 < self.tier_share <= 1:
            raise ValueError(f"tier_share must be in (0, 1], got {self.tier_share}")
        if self.shards is not None:
            object.__setattr__(self, "shards", tuple(sorted({int(k) for k in self.shards})))
            if not self.shards or min(self.shards) < 0:
                raise ValueError(f"shards must be shard indices >= 0 (or None: all), got {self.shards}")
        if self.zero_copy and not self.graphs:
            raise ValueError("zero_copy=True needs graphs=True (the graph gathers the records from the store's map)")

    def replace(self, **changes: object) -> ServingConfig:
        """A copy with ``changes`` applied (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)

    @property
    def torch_device(self) -> torch.device:
        """The device to serve on (None resolved: CUDA when available, else CPU)."""
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
