"""Tests of the synthetic scale-regime dataset (pipeline/data/synthetic_ctr.py, synthetic_dataset.py;
`ckv data synth` in jobs/prepare.py): determinism, validity, the length cap, the planted structure as seen
through the written dataset, and the Bayes ceiling in meta.json recomputed from the dataset alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from collectivekv.jobs.prepare import data
from collectivekv.pipeline.data import synthetic_ctr
from collectivekv.pipeline.data.dataset_schema import SPLITS, CanonicalDataset, load_dataset
from collectivekv.pipeline.data.synthetic_ctr import SynthConfig, build_world, chunk_users, window_share
from collectivekv.pipeline.data.synthetic_dataset import synth_dataset

CFG = SynthConfig(users=150, items=800, clusters=8, max_len=80, seed=3)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CanonicalDataset]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth_dataset(CFG, out, progress=False)
    return out, load_dataset(out)  # load_dataset validates every invariant


def _files(out: Path) -> dict[str, object]:
    tables = {name: pq.read_table(out / name) for name in ("items.parquet", "histories.parquet",
                                                            *(f"samples/{s}.parquet" for s in SPLITS))}
    return {"meta": json.loads((out / "meta.json").read_text()), **tables}


def _raw_histories(ds: CanonicalDataset) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(user ids, raw item ids per user, labels per user) of the histories."""
    raw = ds.items.column("raw_item").to_numpy()
    dense_to_raw = np.concatenate([[0], raw])
    items = [dense_to_raw[np.asarray(x, np.int64)] for x in ds.histories.column("items").to_pylist()]
    labels = [np.asarray(x) for x in ds.histories.column("labels").to_pylist()]
    return ds.histories.column("user_id").to_numpy(), items, labels


def test_deterministic_in_seed_and_chunking_by_users(made: tuple[Path, CanonicalDataset], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = made
    synth_dataset(CFG, tmp_path / "again", progress=False)
    first, again = _files(out), _files(tmp_path / "again")
    for name, value in first.items():
        assert again[name] == value, name
    synth_dataset(SynthConfig(**{**CFG.params(), "seed": 4}), tmp_path / "other", progress=False)
    assert _files(tmp_path / "other")["histories.parquet"] != first["histories.parquet"]
    monkeypatch.setattr(synthetic_ctr, "CHUNK_USERS", 40)  # several chunks: every user id once, in order
    chunks = list(synthetic_ctr.generate(CFG))
    assert len(chunks) == 4
    ids = np.concatenate([ev.user for _, ev in chunks])
    assert np.array_equal(np.unique(ids), np.arange(CFG.users)) and np.all(np.diff(ids) >= 0)


def test_valid_dataset_and_length_cap(made: tuple[Path, CanonicalDataset]) -> None:
    _, ds = made
    lengths = np.diff(np.asarray(ds.histories.column("items").combine_chunks().offsets))
    assert lengths.min() >= 1 and lengths.max() == CFG.max_len  # log-normal, median 40: some reach the cap
    assert ds.n_users == CFG.users and ds.n_genres == CFG.clusters
    assert ds.meta["genres"] == [f"c{c:02d}" for c in range(CFG.clusters)]
    for split in SPLITS:
        assert ds.samples[split].column("hist_len").to_numpy().max() < CFG.max_len
    src = ds.meta["source"]["synthetic"]
    assert src["params"] == CFG.params() and ds.meta["counts"]["events"] == int(lengths.sum())


def test_histories_strictly_increasing_so_hist_len_is_the_position(made: tuple[Path, CanonicalDataset]) -> None:
    _, ds = made
    for ts in ds.histories.column("timestamps").to_pylist():
        assert np.all(np.diff(ts) > 0)


def test_planted_structure_is_measurable(made: tuple[Path, CanonicalDataset]) -> None:
    _, ds = made
    world = build_world(CFG)
    _, items, labels = _raw_histories(ds)
    clusters = [world.item_cluster[x] for x in items]
    same = np.concatenate([c[1:] == c[:-1] for c in clusters]).mean()
    shares = np.bincount(np.concatenate(clusters), minlength=CFG.clusters) / sum(len(c) for c in clusters)
    assert same > 5 * (shares**2).sum()  # sessions stay in one cluster
    nb = np.concatenate([(world.neighbours[x[:-1]] == x[1:, None]).any(axis=1) for x in items]).mean()
    assert nb > 0.4  # the shared item-to-item transitions recur
    favoured, other = [], []
    for c, y in zip(clusters, labels, strict=True):
        for t in range(1, len(c)):
            past = c[max(0, t - CFG.window): t]
            (favoured if (past == c[t]).mean() > 0.5 else other).append(y[t])
    assert np.mean(favoured) > np.mean(other) + 0.2  # clicks follow the recent history's cluster
    stats = ds.meta["source"]["synthetic"]["structure"]
    assert stats["consecutive_same_cluster"] == pytest.approx(same, abs=1e-4)
    assert stats["click_rate_history_favours_target"] == pytest.approx(np.mean(favoured), abs=1e-4)


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC by comparing every (positive, negative) pair (ties count one half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_bayes_auc_equals_the_planted_scores_auc_on_test(made: tuple[Path, CanonicalDataset]) -> None:
    """Recompute each test sample's planted score from the written history (items[:hist_len]), the users'
    tastes and the item effects, by a plain loop; its AUC must be meta.json's Bayes test AUC."""
    _, ds = made
    world = build_world(CFG)
    users, items, _ = _raw_histories(ds)
    tastes = np.concatenate([chunk_users(CFG, lo).tastes for lo in range(0, CFG.users, synthetic_ctr.CHUNK_USERS)])
    raw = np.concatenate([[0], ds.items.column("raw_item").to_numpy()])
    test = ds.samples["test"]
    scores = []
    for u, i, h in zip(test.column("user_id").to_numpy(), raw[test.column("item_id").to_numpy()],
                       test.column("hist_len").to_numpy(), strict=True):
        row = int(np.searchsorted(users, u))
        c = world.item_cluster[i]
        past = world.item_cluster[items[row][max(0, h - CFG.window): h]]
        share = (past == c).mean() if h else 0.0
        affinity = sum(w for w, t in zip(CFG.taste_weights, tastes[u], strict=True) if t == c)
        scores.append(CFG.bias + CFG.share_weight * share + CFG.affinity_weight * affinity + world.item_effect[i])
    labels = test.column("label").to_numpy()
    bayes = ds.meta["source"]["synthetic"]["bayes"]["test"]
    assert bayes["auc"] == pytest.approx(_pairwise_auc(labels, np.asarray(scores)), abs=2e-6)
    assert 0.65 < bayes["auc"] < 0.95


def test_window_share_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, 6)
    user = np.repeat(np.arange(6), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    cluster = rng.integers(0, 3, len(user))
    got = window_share(user, cluster, pos, 5, 3, 30)
    want = [np.mean(cluster[i - min(p, 5): i] == cluster[i]) if p else 0.0 for i, p in enumerate(pos)]
    assert np.allclose(got, want)


def test_cli_synth_and_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["synth", "--users", "30", "--items", "200", "--clusters", "4", "--max-len", "40", "--no-progress"]
    res = runner.invoke(data, [*args, "--out", str(tmp_path / "ds")])
    assert res.exit_code == 0, res.output
    assert "Bayes-optimal test AUC" in res.output and "users 30" in res.output
    res = runner.invoke(data, [*args, "--out", str(tmp_path / "ds")])
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert runner.invoke(data, [*args, "--out", str(tmp_path / "ds"), "--overwrite"]).exit_code == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    res = runner.invoke(data, [*args, "--out", str(tmp_path / "other")])
    assert res.exit_code != 0 and (tmp_path / "other" / "keep.txt").exists()
    res = runner.invoke(data, ["synth", "--clusters", "63", "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "clusters" in res.output
