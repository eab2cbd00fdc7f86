"""The serving options of the CLI, in one place: click options →
:class:`cachestore.decode.runtime_config.ServingConfig`.

``@serving_options`` adds these options to a command and hands it one ``config: ServingConfig`` argument
instead of the separate values (``ckv score`` uses it; a serving command reuses it as it is):

    --device auto|cpu|cuda[:n]          --path auto|fused|poolscore|gather   --pool-dtype store|float32|float16|bfloat16
    --batch-size / --batch-users N      --graphs/--no-graphs                 --zero-copy/--no-zero-copy
    --tier-bytes auto|0|N[K|M|G|KiB|MiB|GiB]                                 --policy lru|s3fifo
    --verify-crc/--no-verify-crc        --shards all|K[,K...]|A-B

Bad values are refused by click with the option's name (a ServingConfig check fails as a ``click.BadParameter``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import click

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_bytes(text: str) -> int | None:
    """``auto`` → None; ``0`` → 0 (off); ``N`` with an optional unit (K, M, G, T: powers of 1000; KiB, MiB, GiB,
    TiB: of 1024; case-insensitive) → bytes. ValueError for anything else."""
    if text.strip().lower() == "auto":
        return None
    m = _SIZE.match(text.lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not a size: use auto, 0, or a number with an optional unit "
                         "(K, M, G, T, KiB, MiB, GiB, TiB), e.g. 8GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class _Bytes(click.ParamType):
    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        try:
            return parse_bytes(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


_OPTIONS = (
    click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:n]"),
    click.option("--path", "decode_path", type=click.Choice(["auto", "fused", "poolscore", "gather"]), default="auto",
                 show_default=True, help="decode path: auto = fused on CUDA with Triton (every model), else "
                                         "gather, the eager reference; poolscore: din only"),
    click.option("--pool-dtype", type=click.Choice(["store", "float32", "float16", "bfloat16"]), default="store",
                 show_default=True, help="precision of the pool rows the fused kernel reads: the store's kv dtype "
                                         "(store), or float32 for the model's rows exactly"),
    click.option("--batch-size", "--batch-users", "batch_users", type=int, default=512, show_default=True,
                 help="users per decode step"),
    click.option("--graphs/--no-graphs", default=False, show_default=True,
                 help="replay a CUDA graph per step (CUDA; every model, on the fused path)"),
    click.option("--zero-copy/--no-zero-copy", default=False, show_default=True,
                 help="with --graphs: gather the records from the LMDB map on the GPU"),
    click.option("--tier-bytes", type=_Bytes(), default="auto", show_default=True,
                 help="resident tier on the device: auto = the whole store if it fits in 80% of the "
                      "free GPU memory, else that much (off on CPU); 0 = off; or a size such as 8GiB"),
    click.option("--policy", type=click.Choice(["lru", "s3fifo"]), default="s3fifo", show_default=True,
                 help="the tier's eviction policy when the store does not fit"),
    click.option("--shards", "shards", default="all", show_default=True,
                 help="shards of a sharded store to serve, e.g. 0 or 0,3 or 0-3 (a user of another shard is "
                      "refused, naming its shard; docs/sharding.md)"),
)


def _verify_crc_option(default: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--verify-crc/--no-verify-crc", default=default, show_default=True,
                        help="CRC-check every record fetched from LMDB (docs/reliability.md: its cost; headers, "
                             "sizes and router index bounds are always checked; the tier checks on admission)")
NAMES = ("device", "decode_path", "pool_dtype", "batch_users", "graphs", "zero_copy", "tier_bytes", "policy",
         "verify_crc", "shards")


def config_from_options(device: str, decode_path: str, pool_dtype: str, batch_users: int, graphs: bool,
                        zero_copy: bool, tier_bytes: int | None, policy: str, verify_crc: bool, shards: str = "all"):
    """The ServingConfig of the option values (``device`` "auto": CUDA when available)."""
    from collectivekv.cachestore.decode.fused import FusedConfig
    from collectivekv.cachestore.decode.runtime_config import ServingConfig
    from collectivekv.cachestore.store.shards import parse_shards

    try:
        return ServingConfig(device=None if device == "auto" else device, path=decode_path, batch_users=batch_users,
                             graphs=graphs, zero_copy=zero_copy, tier_bytes=tier_bytes, policy=policy,
                             verify_crc=verify_crc, fused_config=FusedConfig(pool_dtype=pool_dtype),
                             shards=parse_shards(shards))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def serving_options(fn: Callable[..., Any] | None = None, *, verify_crc: bool = False) -> Any:
    """Decorator: the serving options above, passed to ``fn`` as one ``config`` keyword argument.

    ``@serving_options`` or ``@serving_options(verify_crc=True)`` (the default of ``--verify-crc``: a batch
    job such as ``ckv score`` checks every record, a server relies on the cheap checks)."""
    if fn is None:
        return functools.partial(serving_options, verify_crc=verify_crc)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in NAMES}
        return fn(*args, config=config_from_options(**values), **kwargs)

    for option in reversed((*_OPTIONS, _verify_crc_option(verify_crc))):
        wrapper = option(wrapper)
    return wrapper
