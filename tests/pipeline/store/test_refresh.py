"""The refresh cycle (pipeline/store/refresh.py, `ckv refresh`) on a tiny MovieLens slice, 1 epoch, small dims."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.checkpoint import load_checkpoint
from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.decode.sharded import ShardSetRuntime, open_runtime
from collectivekv.cachestore.store.publish import current_version_id
from collectivekv.jobs.refresh import EXIT_REFUSED, refresh_cmd
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.pipeline.data.dataset_schema import load_dataset
from collectivekv.pipeline.data.prepare import PrepareConfig, prepare
from collectivekv.pipeline.store.refresh import RefreshOptions, RefreshRefused, run_refresh
from collectivekv.pipeline.store.store_ops import CHECKPOINT_DIR, store_checkpoint
from collectivekv.pipeline.store.verify import verify_store
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from collectivekv.pipeline.training.trainer import TrainConfig, build_model, train_model

pytestmark = pytest.mark.spark
ROOT = Path(__file__).resolve().parents[3]
MOVIELENS = ROOT / "data" / "movielens"


def events(tmp: Path) -> tuple[Path, Path]:
    """Day 1: the first 60 users' ratings before a cut time; day 2: all their ratings of the same items."""
    df = pd.read_csv(MOVIELENS / "ratings.csv")
    df = df[df.userId <= 60]
    cut = df.timestamp.quantile(0.7)
    d1 = df[df.timestamp < cut]
    d2 = df[df.movieId.isin(set(d1.movieId))]
    p1, p2 = tmp / "day1.csv", tmp / "day2.csv"
    d1.to_csv(p1, index=False)
    d2.to_csv(p2, index=False)
    return p1, p2


def prep(path: Path) -> PrepareConfig:
    return PrepareConfig(events=path, out=Path("unset"), rating_col="rating", rating_threshold=4.0)


def test_refresh_publishes_model_and_store_together_and_gate_refuses(spark, tmp_path: Path) -> None:  # noqa: ANN001
    day1, day2 = events(tmp_path)
    prepare(PrepareConfig(events=day1, out=tmp_path / "data1", rating_col="rating", rating_threshold=4.0))
    ds1 = load_dataset(tmp_path / "data1")
    cfg = ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=20, mlp_dims=(8,),
                      collective=CollectiveConfig(d_user=1, pool_size=32))
    tcfg = TrainConfig(epochs=1, batch_size=256, progress=False)
    first = train_model(build_model(ds1, cfg, seed=0), ds1, tcfg)
    v0 = save_checkpoint(tmp_path / "ckpt0", first.model, first.metrics())
    store, work = tmp_path / "store", tmp_path / "work"

    report = run_refresh(RefreshOptions(store=str(store), work=str(work), prepare=prep(day2),
                                        current_checkpoint=str(tmp_path / "ckpt0"), train=tcfg, margin=1.0,
                                        prefill={"progress_interval": 1.0, "spark_log_level": None}, spark=spark))
    pub = report["published"]
    assert report["gate"]["passed"] and report["gate"]["current_model"] == v0
    assert pub["model_version"] != v0
    # one version holds both; its manifest names the model it was built with
    assert current_version_id(store) == pub["version_id"]
    ckpt = store_checkpoint(store)
    assert ckpt is not None and ckpt.parent.name == pub["version_id"]
    assert load_checkpoint(ckpt).model_version == pub["model_version"]
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["model_version"] == manifest["checkpoint"]["model_version"] == pub["model_version"]
    assert manifest["checkpoint"]["dir"] == CHECKPOINT_DIR and manifest["refresh"]["gate"]["passed"]
    assert verify_store(store, ckpt, Path(report["steps"]["prepare"]["dataset"])).ok
    rt = DecodeRuntime.open(store, device="cpu")  # serving takes the model from the store version
    assert rt.model_version == pub["model_version"] == rt.layout.model_version
    rt.reader.close()
    assert not [p for p in (store / "staging").iterdir()]  # scratch store removed

    # the gate: a new model must beat the current one by 1.0 GAUC -> refused, exit 3, nothing published
    r = CliRunner().invoke(refresh_cmd, ["--store", str(store), "--work", str(work), "--events", str(day2),
                                         "--epochs", "1", "--batch-size", "256", "--margin", "-1.0"])
    assert r.exit_code == EXIT_REFUSED, r.output
    assert current_version_id(store) == pub["version_id"]
    assert not [p for p in (store / "staging").iterdir()]
    runs = sorted(os.listdir(work))
    refused = json.loads((work / runs[-1] / "refresh.json").read_text())
    assert refused["gate"]["passed"] is False and "published" not in refused
    assert refused["gate"]["current_model"] == pub["model_version"]  # default current: STORE/current/checkpoint
    with pytest.raises(RefreshRefused):
        run_refresh(RefreshOptions(store=str(store), work=str(work), prepare=None,
                                   dataset=report["steps"]["prepare"]["dataset"], train=tcfg, margin=-1.0))


def test_refresh_keeps_item_embeddings_aligned_when_items_change(spark, tmp_path: Path) -> None:  # noqa: ANN001
    """Day 2 drops the largest item id and adds item 0 (sorts first): a fresh numbering would shift every
    other item by one with the same vocabulary size. The refresh extends the current model's catalogue
    and warm-starts by raw id: with lr 0 every kept item's row is the current model's row for that item.
    The refresh publishes a 2-shard store: verified, and served with the model published inside it."""
    day1, _ = events(tmp_path)
    d1 = pd.read_csv(day1)
    dropped = int(d1.movieId.max())
    d2 = d1[d1.movieId != dropped].copy()
    added = d1[d1.movieId == d1.movieId.value_counts().index[0]].assign(movieId=0, timestamp=lambda d: d.timestamp + 1)
    day2 = tmp_path / "day2-changed.csv"
    pd.concat([d2, added]).to_csv(day2, index=False)
    prepare(PrepareConfig(events=day1, out=tmp_path / "data1", rating_col="rating", rating_threshold=4.0))
    ds1 = load_dataset(tmp_path / "data1")
    cfg = ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=20, mlp_dims=(8,),
                      collective=CollectiveConfig(d_user=1, pool_size=32))
    first = train_model(build_model(ds1, cfg, seed=0), ds1, TrainConfig(epochs=1, batch_size=256, progress=False))
    save_checkpoint(tmp_path / "ckpt0", first.model, first.metrics(), ds1.catalogue)
    cur = load_checkpoint(tmp_path / "ckpt0")
    store = tmp_path / "store"
    report = run_refresh(RefreshOptions(store=str(store), work=str(tmp_path / "work"), prepare=prep(day2),
                                        current_checkpoint=str(tmp_path / "ckpt0"),
                                        train=TrainConfig(epochs=1, batch_size=256, lr=0.0, progress=False),
                                        prefill={"progress_interval": 1.0, "spark_log_level": None, "shards": 2},
                                        spark=spark))
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["shards"]["count"] == 2 and manifest["checkpoint"]["dir"] == CHECKPOINT_DIR
    assert report["steps"]["verify"]["ok"] and report["steps"]["verify"]["users_checked"] == manifest["users"] > 0
    new = load_checkpoint(store_checkpoint(store))
    kept = np.setdiff1d(cur.item_catalogue.raw_items, [dropped])
    assert np.array_equal(new.item_catalogue.to_dense(kept), cur.item_catalogue.to_dense(kept))  # ids kept
    assert new.config.n_items == cur.config.n_items + 1 and report["steps"]["train"]["warm_start"]["items_new"] == 1

    def rows(ck, raw: np.ndarray) -> torch.Tensor:  # noqa: ANN001
        return ck.model.item_emb.weight.detach()[torch.from_numpy(ck.item_catalogue.to_dense(raw))]

    torch.testing.assert_close(rows(new, kept), rows(cur, kept), rtol=0, atol=0)
    assert report["gate"]["delta"] == 0.0  # the gate compared against the current model remapped (same rows)
    # serving the published version takes raw ids through the published catalogue
    rt = open_runtime(store, device="cpu")
    assert isinstance(rt, ShardSetRuntime) and rt.model_version == new.model_version
    users = load_dataset(report["steps"]["prepare"]["dataset"]).histories["user_id"].to_numpy()[:4]
    raw = np.array([kept[:3], kept[-3:], [0, kept[0], kept[1]], kept[5:8]])
    by_raw = rt.score_raw(users, raw).logits
    np.testing.assert_array_equal(by_raw, rt.score(users, new.item_catalogue.to_dense(raw)).logits)
    with pytest.raises(ValueError, match=f"item {dropped + 1000} is not in the model's item catalogue"):
        rt.score_raw(users[:1], np.array([[kept[0], dropped + 1000]]))
    rt.close()
