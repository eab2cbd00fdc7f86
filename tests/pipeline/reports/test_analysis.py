"""The paper's analysis (pipeline/reports/analysis.py, analysis_plots.py, `ckv analyze`) on inputs with known
answers, and the HTML report (`ckv report html`): sections, tables, valid embedded PNGs."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from collectivekv.jobs.analysis import analyze as analyze_cmd
from collectivekv.jobs.report import report as report_group
from collectivekv.model.config import CollectiveConfig
from collectivekv.pipeline.reports.analysis import (
    analyze_model,
    cosine_matrix,
    describe,
    index_histogram,
    kde,
    masked_mean,
    most_similar_pair,
    offdiag,
    overlap,
    reference_row,
    svd_split,
    utilisation,
)
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.model.test_model import N_ITEMS, make_model, small_config
from tests.store_fixtures import store_of_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------------ pure math
def test_cosine_identical_orthogonal_opposite_and_zero() -> None:
    x = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 3.0], [-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    m = cosine_matrix(x)
    assert m[0, 1] == pytest.approx(1.0) and m[0, 2] == pytest.approx(0.0) and m[0, 3] == pytest.approx(-1.0)
    assert np.isnan(m[4]).all() and np.isnan(m[:, 4]).all()
    vals = offdiag(m)
    assert len(vals) == 6 and np.isfinite(vals).all()  # pairs of the 4 non-zero rows, each once
    assert sorted(np.round(reference_row(m, 0), 6).tolist()) == [-1.0, 0.0, 1.0]
    same = np.tile(np.random.default_rng(0).normal(size=(1, 8)), (5, 1))
    assert np.allclose(offdiag(cosine_matrix(same)), 1.0)
    d = describe(offdiag(cosine_matrix(np.eye(6))))
    assert d["n"] == 15 and d["mean"] == pytest.approx(0.0) and d["frac_abs_lt_0.5"] == 1.0


def test_masked_mean_ignores_padding() -> None:
    x = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]], [[2.0, 0.0], [9.0, 9.0], [9.0, 9.0]]])
    m = masked_mean(x, torch.tensor([2, 1]))
    assert torch.equal(m, torch.tensor([[2.0, 3.0], [2.0, 0.0]]))
    assert torch.isnan(masked_mean(x, torch.tensor([0, 3]))[0]).all()


def test_svd_split_rank1_residual_zero_and_matches_numpy_svd() -> None:
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(1, 12, 1, generator=g), torch.randn(1, 1, 20, generator=g)
    rank1 = u @ v  # (1, 12, 20)
    p, r, e = svd_split(rank1, torch.tensor([12]), k=1)
    assert torch.allclose(p, rank1, atol=1e-5) and r.abs().max() < 1e-5 and e.item() == pytest.approx(1.0)
    # random K with padding, both branches (L <= d and L > d), against numpy's SVD of the valid rows
    for length, d in ((9, 16), (30, 6)):
        x = torch.randn(4, length, d, generator=g)
        lengths = torch.tensor([length, 3, 1, 0])
        p, r, e = svd_split(x, lengths, k=2)
        for b in range(3):
            n = int(lengths[b])
            kb = x[b, :n].double().numpy()
            _, s, vh = np.linalg.svd(kb, full_matrices=False)
            want = kb @ vh[:2].T @ vh[:2]
            np.testing.assert_allclose(p[b, :n].numpy(), want, atol=1e-4)
            np.testing.assert_allclose((p + r)[b, :n].numpy(), kb, atol=1e-5)
            assert e[b].item() == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), abs=1e-6)
            assert p[b, n:].abs().max() == 0 if n < length else True
        assert torch.isnan(e[3])
    with pytest.raises(ValueError):
        svd_split(x, lengths, k=0)


def test_index_histogram_overlap_utilisation_pair_kde() -> None:
    h = index_histogram(np.array([0, 49, 50, 999, 999]), 1000, 50)
    assert len(h) == 20 and h[0] == 2 and h[1] == 1 and h[19] == 2 and h.sum() == 5
    assert len(index_histogram(np.array([0]), 1001, 100)) == 11
    with pytest.raises(ValueError):
        index_histogram(np.array([1000]), 1000, 50)
    a = np.array([1, 2, 3, 3, 4])
    assert overlap(a, a[::-1])["jaccard"] == 1.0 and overlap(a, a)["overlap_coefficient"] == 1.0
    assert overlap(a, np.array([7, 8]))["jaccard"] == 0.0
    o = overlap(np.array([1, 2, 3, 4]), np.array([3, 4, 5]))
    assert (o["intersection"], o["union"], o["jaccard"], o["overlap_coefficient"]) == (2, 5, 0.4, 2 / 3)
    u = utilisation(np.full(64, 10))
    assert u["never_chosen_frac"] == 0 and u["entropy_normalised"] == pytest.approx(1.0)
    assert u["perplexity"] == pytest.approx(64)
    one = np.zeros(64)
    one[5] = 7
    u = utilisation(one)
    assert u["never_chosen"] == 63 and u["entropy_normalised"] == 0.0 and u["max_share"] == 1.0
    sqrt = np.r_[np.ones(16), np.zeros(240)]  # 16 of 256 rows used evenly: log 16 / log 256
    assert utilisation(sqrt)["entropy_normalised"] == pytest.approx(0.5)
    assert utilisation(sqrt)["never_chosen_frac"] == pytest.approx(240 / 256)
    emb = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [1.0, 0.0]])
    i, j, s = most_similar_pair(emb)
    assert (i, j) == (0, 3) and s == pytest.approx(1.0)
    excl = np.zeros((4, 4), dtype=bool)
    excl[0, 3] = excl[3, 0] = True
    i, j, s = most_similar_pair(emb, excl)
    assert {i, j} in ({0, 1}, {1, 3}) and s < 1.0
    grid = np.linspace(-1, 1, 401)
    dens = kde(np.random.default_rng(1).normal(0, 0.1, 5000), grid)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=0.01)
    assert grid[np.argmax(dens)] == pytest.approx(0, abs=0.03)


# ---------------------------------------------------------------------------------- model level
def _windows(n: int, seq: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    lengths = g.integers(1, seq + 1, n)
    items = g.integers(1, N_ITEMS + 1, (n, seq))
    fb = g.integers(1, 3, (n, seq))
    pad = np.arange(seq)[None, :] >= lengths[:, None]
    items[pad], fb[pad] = 0, 0
    return items, fb, lengths


def test_analyze_model_collective_and_full() -> None:
    cfg = small_config(max_len=10, collective=CollectiveConfig(d_user=2, pool_size=60))
    model = make_model(cfg, seed=3).eval()
    items, fb, lengths = _windows(40, 10, seed=4)
    items[1], fb[1], lengths[1] = items[0], fb[0], lengths[0]  # an identical pair: must not be Figure 7's pair
    a = analyze_model(model, items, fb, lengths, n_sample=30, n_router_users=5, k=1, seed=0)
    s = a.summary
    assert s["sampled_users"] == 30 and s["users"] == 40
    assert s["fig1"]["mean_K"]["pairs"]["n"] == 30 * 29 // 2
    r = s["router"]
    usage = a.arrays["usage_K"]
    assert usage.sum() == lengths.sum() and len(usage) == 60  # every behaviour of every user counted once
    assert r["utilisation_K"]["used"] + r["utilisation_K"]["never_chosen"] == 60
    assert len(a.arrays["fig6_K"]) == 60 // 50 + 1 and r["fig6_K"]["behaviours"] <= 5 * 10
    f7 = r["fig7"]
    rows = f7["user_rows"]
    assert not (np.array_equal(items[rows[0]], items[rows[1]]) and np.array_equal(fb[rows[0]], fb[rows[1]]))
    assert 0 <= f7["overlap_K"]["jaccard"] <= 1 and len(a.arrays["fig7_K_a"]) == 1
    full = make_model(small_config(kv_mode="full"), seed=3).eval()
    a = analyze_model(full, items[:, :8], fb[:, :8], np.minimum(lengths, 8), n_sample=10, seed=0)
    assert a.summary["router"] is None and "no router" in a.summary["router_note"]
    with pytest.raises(ValueError):
        analyze_model(torch.nn.Linear(2, 2), items, fb, lengths)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A saved tiny collective checkpoint, histories Parquet for 60 users, a store of them."""
    root = tmp_path_factory.mktemp("analysis")
    model = make_model(small_config(collective=CollectiveConfig(d_user=2, pool_size=60)), seed=5).eval()
    version = save_checkpoint(root / "ckpt", model, {})
    g = np.random.default_rng(9)
    users = list(range(1000, 1060))
    hl = g.integers(1, 20, len(users))
    items = [g.integers(1, N_ITEMS + 1, n).tolist() for n in hl]
    labels = [g.integers(0, 2, n).tolist() for n in hl]
    pq.write_table(pa.table({"user_id": pa.array(users, pa.int64()), "items": pa.array(items, pa.list_(pa.int32())),
                             "labels": pa.array(labels, pa.list_(pa.int8()))}), root / "histories.parquet")
    from collectivekv.pipeline.data.history import HistoryIndex

    w = HistoryIndex(pq.read_table(root / "histories.parquet")).window(np.array(users), None, model.cfg.max_len)
    store_of_model(root / "store", model, version, users, torch.from_numpy(w.items), torch.from_numpy(w.feedback),
                   torch.from_numpy(w.lengths))
    return {"root": root, "ckpt": root / "ckpt", "hist": root / "histories.parquet", "store": root / "store"}


def test_cli_analyze_writes_pngs_and_json(tiny: dict, tmp_path: Path) -> None:
    res = CliRunner().invoke(analyze_cmd, ["--checkpoint", str(tiny["ckpt"]), "--histories", str(tiny["hist"]),
                                           "--out", str(tmp_path), "--users", "40", "--svd-k", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "analysis.json").read_text())
    assert summary["svd_k"] == 1 and summary["sampled_users"] == 40
    assert set(summary["figures"]) == {"fig1_similarity", "fig2_principal_residual", "fig6_router_activations",
                                       "fig7_similar_users", "pool_utilisation"}
    for path in summary["figures"].values():
        assert Path(path).read_bytes().startswith(PNG_MAGIC)
    assert all(1000 <= u < 1060 for u in summary["router"]["fig7"]["user_ids"])
    res = CliRunner().invoke(analyze_cmd, ["--checkpoint", str(tiny["root"]), "--histories", str(tiny["hist"]),
                                           "--out", str(tmp_path)])
    assert res.exit_code == 1 and "not a checkpoint" in res.output


def test_cli_analyze_keeps_both_of_two_checkpoints_named_alike(tiny: dict, tmp_path: Path) -> None:
    import shutil

    a, b = tmp_path / "run1" / "ckpt", tmp_path / "run2" / "ckpt"
    shutil.copytree(tiny["ckpt"], a)
    shutil.copytree(tiny["ckpt"], b)
    res = CliRunner().invoke(analyze_cmd, ["--checkpoint", str(a), "--checkpoint", str(b), "--histories",
                                           str(tiny["hist"]), "--out", str(tmp_path / "out"), "--users", "20"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*analysis.json")) == ["0_ckpt_analysis.json",
                                                                                  "1_ckpt_analysis.json"]


# ---------------------------------------------------------------------------------- html report
class _Tags(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.imgs: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self.tables += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def _check_page(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert p.ids[:4] == ["size", "capacity", "latency", "analysis"]
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
    assert not re.search(r"(src|href)=['\"](https?:|file:|/)", page)  # self-contained
    return p


def test_html_report_sections_tables_and_images(tiny: dict, tmp_path: Path) -> None:
    results = tmp_path / "results"
    for name in ("decode_latency/decode_latency_cpu_dryrun.json", "prefill/prefill_cpu.json"):
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "benchmarks/results" / name, results / name)
    out = tmp_path / "report.html"
    res = CliRunner().invoke(report_group, ["html", str(tiny["store"]), "--checkpoint", str(tiny["ckpt"]),
                                            "--histories", str(tiny["hist"]), "--out", str(out), "--users", "30",
                                            "--results-dir", str(results), "--project-users", "1000000"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    p = _check_page(page)
    assert len(p.imgs) == 5 and p.tables >= 7
    for text in ("Size report", "CR formula", "Capacity: full KV vs CollectiveKV", "This store's users (60)",
                 "Projection to 1,000,000 users", "GPU-resident pool", "CPU DRY RUN", "is missing",
                 "published H100", "Nightly prefill throughput", "Figure 7 pair", "never chosen"):
        assert text in page, text
    # a GPU result, when present, replaces the dry run (and its bandwidth is the measured one)
    gpu = json.loads((results / "decode_latency/decode_latency_cpu_dryrun.json").read_text())
    gpu.update(dry_run=False, note="H2D + decode on the GPU",
               machine={**gpu["machine"], "gpu": "NVIDIA H100 80GB HBM3"})
    gpu["copy_limits"].update(floor_gb_per_s=53.0, floor_fixed_ms=0.02)
    (results / "decode_latency/decode_latency.json").write_text(json.dumps(gpu))
    from collectivekv.pipeline.reports.html_report import build_report

    page = build_report(tiny["store"], tiny["ckpt"], histories=tiny["hist"], results_dir=results, analysis_users=20,
                        project_users=10)
    _check_page(page)
    assert "CPU DRY RUN" not in page and "NVIDIA H100" in page and "measured by benchmarks/decode_latency.py" in page
