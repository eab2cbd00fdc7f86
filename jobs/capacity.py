"""`ckv capacity`: full KV vs CollectiveKV storage, GPU memory and transfer for a user base
(argument parsing only; the model is pipeline/reports/capacity.py, docs/capacity.md explains it)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

# the CLI's default place for benchmark results (the library has none): benchmarks/results of the
# working directory, which is the repository root for `make demo` and the docs' commands
DEFAULT_RESULTS_DIR = Path("benchmarks/results")
# the history lengths planned for when neither --length-dist nor --store is given: the paper's MicroVideo
# dataset (mean 150, p50 122, p90 253 behaviours, capped at 1,000), stated in the output
DEFAULT_LENGTH_DIST = "150,122,253,1000"


POSITIVE, NON_NEGATIVE = click.IntRange(min=1), click.FloatRange(min=0)


@click.command("capacity")
@click.option("--users", type=POSITIVE, default=None,
              help="users to plan for (default: the user count of --store / --length-dist STORE)")
@click.option("--length-dist", "length_spec", default=None, metavar="STORE|FILE|mean,p50,p90,max",
              help="history lengths: a published store (its cached lengths), a histories Parquet (file, dir or "
                   "dataset), or mean,p50,p90,max (log-normal fitted to p50/p90, truncated at max); default with "
                   f"neither this nor --store: {DEFAULT_LENGTH_DIST} (the paper's MicroVideo histories)")
@click.option("--store", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a real store: its layout gives the defaults below and its measured LMDB overhead calibrates "
                   "the matching column (default: --length-dist when that is a store)")
@click.option("--d-attn", type=POSITIVE, default=None,
              help="attention dim d_a (default 256 or the store's)")
@click.option("--d-user", type=POSITIVE, default=None,
              help="user-specific dims d_u (default 1 or the store's)")
@click.option("--pool", "pool_size", type=POSITIVE, default=None,
              help="global pool rows (default 10,000 or the store's)")
@click.option("--dtype", "kv_dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="stored K/V dtype (default float16 or the store's)")
@click.option("--full-dtype", "full_kv_dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="dtype of the full-KV column (default: --dtype)")
@click.option("--index-dtype", type=click.Choice(["auto", "uint16", "int32"]), default=None,
              help="router index width (auto: uint16 while pool <= 65,536)")
@click.option("--share", type=click.Choice(["kv", "k", "v"]), default=None, help="which of K/V are shared")
@click.option("--max-len", type=POSITIVE, default=None,
              help="behaviours cached per user (default: the store's max_len; none for a file / quantiles)")
@click.option("--batch", type=POSITIVE, default=512, show_default=True, help="users per request batch")
@click.option("--bandwidth", "bw_spec", default="measured", show_default=True,
              help="host->GPU GB/s, or 'measured' (decode_latency/*.json of --results-dir; falls back to "
                   "a published H100 figure, 51-55 GB/s, labelled)")
@click.option("--latency-us", type=NON_NEGATIVE, default=None,
              help="fixed per-copy latency (default 20 us or measured)")
@click.option("--host-mem-gib", type=NON_NEGATIVE, default=512.0, show_default=True,
              help="host memory budget")
@click.option("--gpu-mem-gib", type=NON_NEGATIVE, default=80.0, show_default=True,
              help="GPU memory budget")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RESULTS_DIR,
              show_default=True, help="benchmark results directory (decode_latency/*.json etc.), read only")
@click.option("--items", type=POSITIVE, default=None,
              help="item vocabulary: also size the token-table alternative (token ids + a GPU table per token)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of the table")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the JSON to this file")
def capacity(users: int | None, length_spec: str | None, store: Path | None, d_attn: int | None,
             d_user: int | None, pool_size: int | None, kv_dtype: str | None, full_kv_dtype: str | None,
             index_dtype: str | None, share: str | None, max_len: int | None, batch: int, bw_spec: str,
             latency_us: float | None, host_mem_gib: float, gpu_mem_gib: float, results_dir: Path | None,
             items: int | None, as_json: bool, json_out: Path | None) -> None:
    """Bytes per user, store size, GPU pool, H2D bytes/time per batch and users per memory budget,
    full KV vs CollectiveKV."""
    from collectivekv.pipeline.reports.capacity import Budgets, CacheFormat, capacity_plan
    from collectivekv.pipeline.reports.capacity_inputs import (
        bandwidth,
        is_store,
        length_dist,
        store_calibration,
        store_format,
    )

    try:
        if store is None and length_spec is not None and is_store(length_spec):
            store = Path(length_spec)
        if store is not None and not is_store(store):  # (a version or shard directory is not read as histories)
            raise ValueError(f"--store {store}: not a store root (no published 'current' version under it)")
        default_dist = length_spec is None and store is None
        if default_dist and users is None:
            raise ValueError("give --users N (and optionally --length-dist), or --store / --length-dist STORE")
        if length_spec is None:
            length_spec = DEFAULT_LENGTH_DIST if default_dist else str(store)
        dist = length_dist(length_spec)
        if default_dist:
            dist = replace(dist, note=f"default length distribution {DEFAULT_LENGTH_DIST} (mean,p50,p90,max: the "
                                      f"paper's MicroVideo histories; --length-dist to change): {dist.note}")
        opts = {"d_attn": d_attn, "d_user": d_user, "pool_size": pool_size, "kv_dtype": kv_dtype,
                "full_kv_dtype": full_kv_dtype, "index_dtype": index_dtype, "max_len": max_len}
        if share is not None:
            opts.update(share_k="k" in share, share_v="v" in share)
        calibration = None
        if store is not None:
            fmt = store_format(store, **opts)
            calibration = store_calibration(store)
        else:
            fmt = CacheFormat(**{k: v for k, v in opts.items() if v is not None})
        if users is None:
            if dist.observed_users is None:
                raise ValueError("--users is needed with a mean,p50,p90,max length distribution")
            users = calibration.users if calibration is not None else dist.observed_users
        bw = bandwidth(bw_spec, results_dir, latency_us)
        plan = capacity_plan(users, dist, fmt, batch=batch, bandwidth=bw,
                             budgets=Budgets(host_mem_gib, gpu_mem_gib), calibration=calibration)
        if items is not None:
            plan["token_table"] = token_alternative(plan, fmt, items, gpu_mem_gib, dist)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    echo_plan(plan, as_json, json_out)


def echo_plan(plan: dict, as_json: bool, json_out: Path | None) -> None:
    """Print the plan (JSON or the table, then the token-table alternative when sized); also write its JSON."""
    from collectivekv.pipeline.reports.capacity_table import capacity_table, format_table
    from collectivekv.pipeline.reports.token_table import token_lines

    text = json.dumps(plan, indent=2, default=float)
    if json_out is not None:
        json_out.write_text(text + "\n")
    if as_json:
        click.echo(text)
        return
    click.echo(format_table(capacity_table(plan)))
    if "token_table" in plan:
        click.echo("\n" + "\n".join(token_lines(plan["token_table"])))


def token_alternative(plan: dict, fmt: object, items: int, gpu_mem_gib: float, dist: object) -> dict:
    """The token-table alternative (pipeline/reports/token_table.py) for the plan's users and lengths (``dist``):
    the planned format's model over ``items`` items."""
    import numpy as np

    from collectivekv.cachestore.store.record import KV_DTYPES
    from collectivekv.model.cache_spec import full_kv_bytes
    from collectivekv.pipeline.reports.capacity_zoo import ZooFormat
    from collectivekv.pipeline.reports.token_table import token_table

    users = plan["users"]
    behaviours = round(users * plan["lengths"]["mean"])
    cfg = replace(fmt.model_config(), n_items=items)  # type: ignore[attr-defined]
    if isinstance(fmt, ZooFormat):  # windows of their own (a short and a long one): the CR denominator per length
        cached = dist.clip(fmt.max_len)  # type: ignore[attr-defined]
        full = users * cached.expect(np.array([full_kv_bytes(cfg, int(n)) for n in cached.lengths]))
    else:  # din: K and V of d_a per cached behaviour
        full = behaviours * 2 * cfg.d_attn * 4
    return token_table(cfg, users=users, behaviours=behaviours,
                       kv_itemsize=KV_DTYPES[fmt.kv_dtype][1].itemsize,  # type: ignore[attr-defined]
                       full_fp32_bytes=full, collective_store_bytes=plan["collective"]["total"]["payload"],
                       gpu_budget_bytes=gpu_mem_gib * 2**30)
