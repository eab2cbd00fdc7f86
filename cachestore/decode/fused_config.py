"""Launch settings of the fused attention kernels (:mod:`cachestore.decode.fused`, :mod:`cachestore.decode.fused_zoo`):
:class:`FusedConfig`, how a launch splits histories into parts (:func:`split_parts`) and the precision
of the pool rows it reads (:func:`pool_dtype`), and the byte ranges a batch's launches split its users by
(:func:`check_chunks`). Imports no Triton."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from collectivekv.cachestore.decode.transfer import KV_TORCH

if TYPE_CHECKING:
    from collectivekv.cachestore.decode.batch import StoreLayout

STORE = "store"  # FusedConfig.pool_dtype: read the pool rows at the store's kv dtype


@dataclass(frozen=True)
class FusedConfig:
    """Launch settings of the fused kernel (derive variants with ``dataclasses.replace``).

    block_l: behaviours per online-softmax step; num_warps; heads_per_program: heads one program
    handles (a power of two dividing H; they share each behaviour's index and user-part loads);
    num_stages: Triton's software-pipelining depth of the behaviour loop (None: Triton's default);
    split_l: parts each user's history is split into, one program each, their softmax states combined by
    a second kernel (flash-decoding; a power of two; None: :func:`split_parts` picks from the launch size);
    pool_dtype: the precision of the pool rows the kernel reads — "store" (default): the store's ``kv_dtype``,
    so both parts of each K/V row have the precision the store was written at (an fp16 store, the default,
    reads fp16 pool rows: half the pool reads of fp32, the bound of the kernel, see :mod:`cachestore.decode.fused`;
    an fp32 store reads the model's rows exactly); "float32" (exact whatever the store), "float16" or
    "bfloat16" to override. The defaults (BLOCK_L 16, 1 warp, 2 heads
    per program, auto split) are the fastest setting timed inside the serving graph on an H100
    (``benchmarks/decode_latency.py --compare-launch``, round-robin at L 1000, B 64/256/512, fp32 and fp16
    pools: ``benchmarks/results/decode_latency/decode_latency_launch{2,3}_float{16,32}.json``): at B 512 0.174 ms (fp16
    pools) and 0.244 ms (fp32) against 0.206 and 0.267 ms for BLOCK_L 32, 2 warps, 2 parts.
    The kernel timed alone from Python (``benchmarks/fused_kernel.py``) includes each launch's CPU cost,
    which the graph does not pay, so tune in the graph.
    """

    block_l: int = 16
    num_warps: int = 1
    heads_per_program: int = 2
    num_stages: int | None = None
    split_l: int | None = None
    pool_dtype: str = STORE

    def __post_init__(self) -> None:
        if self.pool_dtype != STORE and self.pool_dtype not in KV_TORCH:
            raise ValueError(f"pool_dtype must be one of {[STORE, *sorted(KV_TORCH)]}, got {self.pool_dtype!r}")
        for name in ("block_l", "num_warps", "heads_per_program"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.split_l is not None and (self.split_l < 1 or self.split_l & (self.split_l - 1)):
            raise ValueError(f"split_l must be a power of two, got {self.split_l}")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


DEFAULT_FUSED = FusedConfig()
ALL_BYTES = ((-1, 1 << 62),)  # one launch for every user (record ends in (-1, 2^62])


# split_parts' budget of programs per SM: with the 1-warp default launch, 64 (two waves of an H100 SM's 32
# resident blocks) was fastest inside the serving graph at B 64-512, L 1000 (8 parts at B 512 against 2 under
# a budget of 16: benchmarks/results/decode_latency/decode_latency_launch3_float{16,32}.json)
PROGRAMS_PER_SM = 64


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_parts(config: FusedConfig, rows: int, groups: int, max_len: int, device: torch.device) -> int:
    """Parts each user's behaviours are split into (one program each, combined after): ``config.split_l``,
    or for None the largest power of two that keeps rows · groups · parts within PROGRAMS_PER_SM per SM
    (the kernel walks its behaviours serially: with few users, few programs would each take the whole
    history's latency) and parts at least 2 blocks long."""
    if config.split_l is not None:
        return config.split_l
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    parts = 1
    while parts * 2 * rows * groups <= PROGRAMS_PER_SM * sms and parts * 2 * 2 * config.block_l <= max_len:
        parts *= 2
    return parts


def launch_shape(config: FusedConfig, rows: int, groups: int, span: int, launches: int, device: torch.device
                 ) -> tuple[int, int]:
    """(parts, steps per part) of a launch over ``span`` steps per row (whole BLOCK_L blocks per part)."""
    parts = split_parts(config, -(-rows // launches), groups, span, device)  # programs busy per launch
    return parts, -(-span // (parts * config.block_l)) * config.block_l


def pool_dtype(config: FusedConfig, layout: StoreLayout) -> str:
    """The pool-row precision a launch with ``config`` reads for a store of ``layout``: ``config.pool_dtype``,
    or the store's kv_dtype where that is "store"."""
    return layout.kv_dtype if config.pool_dtype == STORE else config.pool_dtype


def check_launch(n_heads: int, d_a: int, config: FusedConfig) -> None:
    """ValueError unless the kernel can split d_a into ``n_heads`` power-of-two heads, ``config``'s groups."""
    dh = d_a // n_heads
    if dh & (dh - 1):
        raise ValueError(f"the fused kernel needs a power-of-two head dim, got {dh}")
    if n_heads % config.heads_per_program:
        raise ValueError(f"heads_per_program must be a power of two dividing {n_heads}, got "
                         f"{config.heads_per_program}")


def serves_everyone(chunks: Sequence[tuple[int, int]]) -> bool:
    """Whether launches over ``chunks`` serve every user of any batch (their ranges span :data:`ALL_BYTES`'s)."""
    return chunks[0][0] <= ALL_BYTES[0][0] and chunks[-1][1] >= ALL_BYTES[0][1]


def check_chunks(chunks: Sequence[tuple[int, int]], raw: torch.Tensor) -> None:
    """ValueError unless ``chunks`` are contiguous (lo, hi] byte ranges from below 0 to past the batch ``raw``: every
    record ends in exactly one, so each user is served by exactly one launch."""
    if (not chunks or chunks[0][0] >= 0 or chunks[-1][1] < raw.numel() or any(lo >= hi for lo, hi in chunks)
            or any(a[1] != z[0] for a, z in itertools.pairwise(chunks))):
        raise ValueError(f"chunks must be contiguous (lo, hi] byte ranges from below 0 to past the batch, got {chunks}")
