"""Warm start by raw id (pipeline/training/warm_start.py, `ckv train --init-from`) and raw item ids in `ckv score`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.checkpoint import Checkpoint, load_checkpoint
from collectivekv.jobs.cli import main
from collectivekv.jobs.score import score as score_cmd
from collectivekv.pipeline.data.dataset_schema import load_dataset
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from collectivekv.pipeline.training.trainer import build_model
from collectivekv.pipeline.training.warm_start import WarmStartError, warm_start
from tests.store_fixtures import store_of_model

TINY = ["--embed-dim", "8", "--d-attn", "16", "--heads", "2", "--pool-size", "16", "--max-len", "10",
        "--epochs", "1", "--batch-size", "256", "--no-progress"]  # fmt: skip
DAY1 = list(range(10, 60, 5))  # 10 items
DAY2 = [1, *DAY1[:-1], 99]  # 55 replaced by 1 (sorts first: a fresh numbering shifts every item), 99 added


def prepare(root: Path, name: str, items: list[int], *extra: str) -> Path:
    """Each of 30 users rates every item once (genres per item); `ckv data prepare` into root/name."""
    rows = [(u, it, 4.0 if (u * 7 + it) % 3 else 2.0, 100 * k + u) for u in range(1, 31) for k, it in enumerate(items)]
    events, movies = root / f"{name}.csv", root / f"{name}-movies.csv"
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(events, index=False)
    pd.DataFrame({"movieId": items, "genres": [f"G{it % 3}|H{it % 2}" for it in items]}).to_csv(movies, index=False)
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(events), "--items", str(movies),
                                    "--out", str(root / name), *extra])
    assert res.exit_code == 0, res.output
    return root / name


def train(data: Path, out: Path, *extra: str) -> Checkpoint:
    res = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out), *TINY, *extra])
    assert res.exit_code == 0, res.output
    return load_checkpoint(out)


def rows_by_raw(ck: Checkpoint, raw: list[int]) -> torch.Tensor:
    return ck.model.item_emb.weight.detach()[torch.from_numpy(ck.item_catalogue.to_dense(np.array(raw)))]


def rows_by_genre(ck: Checkpoint, names: list[str]) -> torch.Tensor:
    return ck.model.genre_emb.weight.detach()[torch.from_numpy(ck.item_catalogue.genre_ids(names))]


@pytest.fixture(scope="module")
def day1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Checkpoint]:
    root = tmp_path_factory.mktemp("days")
    data = prepare(root, "data1", DAY1)
    return data, train(data, root / "ck1")


@pytest.mark.parametrize("numbering", ["extended", "fresh"])
def test_init_from_keeps_item_rows_aligned_by_raw_id(day1: tuple[Path, Checkpoint], tmp_path: Path,
                                                     numbering: str) -> None:
    data1, ck1 = day1
    extra = ["--catalogue", str(ck1.path)] if numbering == "extended" else ["--new-catalogue"]
    data2 = prepare(tmp_path, "data2", DAY2, *extra)
    ds2 = load_dataset(data2)
    moved = ds2.item_catalogue.to_dense(np.array(DAY1[:-1])) != ck1.item_catalogue.to_dense(np.array(DAY1[:-1]))
    assert moved.all() if numbering == "fresh" else not moved.any()
    ck2 = train(data2, tmp_path / "ck2", "--init-from", str(ck1.path), "--lr", "0")  # lr 0: rows as loaded
    kept = DAY1[:-1]
    torch.testing.assert_close(rows_by_raw(ck2, kept), rows_by_raw(ck1, kept), rtol=0, atol=0)
    torch.testing.assert_close(rows_by_genre(ck2, ["G0", "H1"]), rows_by_genre(ck1, ["G0", "H1"]), rtol=0, atol=0)
    fresh = build_model(ds2, ck1.config, seed=0).item_emb.weight.detach()  # new items: the fresh init rows
    new_rows = torch.from_numpy(ck2.item_catalogue.to_dense(np.array([1, 99])))
    torch.testing.assert_close(ck2.model.item_emb.weight.detach()[new_rows], fresh[new_rows], rtol=0, atol=0)
    report = json.loads((tmp_path / "ck2" / "metrics.json").read_text())["warm_start"]
    # the extended catalogue still holds item 55 (no events today): its row is kept too
    want = {"fresh": (11, 9, 1), "extended": (12, 10, 0)}[numbering]
    assert report["mode"] == "raw_id" and report["items_new"] == 2
    assert (ck2.config.n_items, report["items_kept"], report["items_dropped"]) == want


def test_checkpoint_without_catalogue_warm_starts_by_position_only(day1: tuple[Path, Checkpoint],
                                                                   tmp_path: Path) -> None:
    data1, ck1 = day1
    save_checkpoint(tmp_path / "old", ck1.model, {})  # as written before catalogues: no catalogue.parquet
    old = load_checkpoint(tmp_path / "old")
    assert old.catalogue is None and not (tmp_path / "old" / "catalogue.parquet").exists()
    ds1 = load_dataset(data1)
    model = build_model(ds1, ck1.config, seed=5)
    assert warm_start(model, old, ds1.catalogue).mode == "positional"
    torch.testing.assert_close(model.item_emb.weight, ck1.model.item_emb.weight, rtol=0, atol=0)
    ds2 = load_dataset(prepare(tmp_path, "data2", DAY2))
    with pytest.raises(WarmStartError, match="no item catalogue .* n_items 10 -> 11"):
        warm_start(build_model(ds2, ck1.config), old, ds2.catalogue)
    with pytest.raises(WarmStartError, match="model config differs"):
        warm_start(build_model(ds1, ck1.config.__class__(**{**ck1.config.__dict__, "d_attn": 32})), ck1,
                   ds1.catalogue)


def test_ckv_score_takes_raw_item_ids(day1: tuple[Path, Checkpoint], tmp_path: Path) -> None:
    data1, ck1 = day1
    cat = ck1.item_catalogue
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([0, 3, 10, 7])
    items = torch.randint(1, cat.n_items + 1, (4, 10), generator=g) * (torch.arange(10) < lengths[:, None])
    feedback = (items > 0).long() * torch.randint(1, 3, (4, 10), generator=g)
    store = store_of_model(tmp_path / "store", ck1.model, ck1.model_version, [1, 2, 3, 4], items, feedback,
                           lengths, "collective", "float32")
    rng = np.random.default_rng(1)
    users, raw = rng.integers(1, 6, 40), rng.choice(DAY1, 40)
    pq.write_table(pd.DataFrame({"user_id": users, "item_id": raw}).pipe(_table), tmp_path / "raw.parquet")
    pq.write_table(pd.DataFrame({"user_id": users, "item_id": cat.to_dense(raw)}).pipe(_table),
                   tmp_path / "dense.parquet")
    base = ["--store", str(store), "--checkpoint", str(ck1.path), "--device", "cpu", "--chunk-rows", "16"]
    for name, flag in (("raw", []), ("dense", ["--dense-ids"])):
        res = CliRunner().invoke(score_cmd, [*base, "--requests", str(tmp_path / f"{name}.parquet"),
                                             "--out", str(tmp_path / f"{name}-scores.parquet"), *flag])
        assert res.exit_code == 0, res.output
    got, want = (pq.read_table(tmp_path / f"{n}-scores.parquet") for n in ("raw", "dense"))
    assert got["item_id"].to_pylist() == raw.tolist()  # the input ids are passed through
    np.testing.assert_array_equal(got["logit"].to_numpy(), want["logit"].to_numpy())
    # raw ids that are dense ids of other items (5 = dense id of raw 30) no longer score another item
    assert 5 not in DAY1 and cat.n_items >= 5
    bad = pd.DataFrame({"user_id": [1, 2, 3], "item_id": [10, 15, 5]})
    bad.to_csv(tmp_path / "bad.csv", index=False)
    res = CliRunner().invoke(score_cmd, [*base, "--requests", str(tmp_path / "bad.csv"),
                                         "--out", str(tmp_path / "bad-scores.parquet")])
    assert res.exit_code == 1
    assert "row 3 (data rows from 1): item_id 5 is not in the model's item catalogue" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "bad-scores.parquet").exists()


def _table(df: pd.DataFrame):  # noqa: ANN202
    import pyarrow as pa

    return pa.Table.from_pandas(df.astype("int64"), preserve_index=False)


def test_prefill_refuses_histories_numbered_by_another_catalogue(day1: tuple[Path, Checkpoint],
                                                                 tmp_path: Path) -> None:
    from collectivekv.cachestore.store.catalogue import CatalogueError, check_same_numbering
    from collectivekv.pipeline.prefill.spark_job import PrefillOptions, run_prefill

    _, ck1 = day1
    fresh = prepare(tmp_path, "fresh", DAY2, "--new-catalogue")
    with pytest.raises(CatalogueError, match="numbers items differently from the model's"):
        run_prefill(PrefillOptions(checkpoint=str(ck1.path), histories=str(fresh), store=str(tmp_path / "s")))
    assert not (tmp_path / "s").exists()  # refused before Spark starts
    check_same_numbering(ck1.catalogue, prepare(tmp_path, "extended", DAY2, "--catalogue", str(ck1.path)))


def test_sim_keyed_by_its_index_rebuilds_its_genre_blocks(tmp_path: Path) -> None:
    """SIM with keys from its router index: a warm start onto a dataset numbered afresh rebuilds the item → genre-set
    block table from the new dataset (never copied by dense id), so every item keeps its own genre set's block."""
    sim = ["--arch", "sim", "--long-len", "12", "--retrieval-keys", "pool", "--share", "both"]
    ck1 = train(prepare(tmp_path, "data1", DAY1), tmp_path / "ck1", *sim)
    data2 = prepare(tmp_path, "data2", DAY2, "--new-catalogue")
    ck2 = train(data2, tmp_path / "ck2", *sim, "--init-from", str(ck1.path), "--lr", "0")
    want = build_model(load_dataset(data2), ck2.config, seed=0)
    assert torch.equal(ck2.model.item_block_start, want.item_block_start)
    assert torch.equal(ck2.model.row_categories, want.row_categories)
    assert not torch.equal(ck2.model.item_block_start, ck1.model.item_block_start)  # the numbering moved


def test_options_that_change_nothing_do_not_block_a_warm_start(day1: tuple[Path, Checkpoint]) -> None:
    """``retrieval_keys="pool"`` on a din model (it has no retrieval keys) leaves the model as it was: the checkpoint
    trained without it warm-starts the model built with it."""
    data1, ck1 = day1
    ds1 = load_dataset(data1)
    inert = dataclasses.replace(ck1.config, retrieval_keys="pool")
    assert not inert.pool_keys and inert != ck1.config
    assert warm_start(build_model(ds1, inert, seed=3), ck1, ds1.catalogue).mode == "raw_id"
