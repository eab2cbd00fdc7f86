"""The zoo latency benchmark (benchmarks/zoo_latency.py) end to end on CPU, tiny shapes: din's collective
path (GraphedDecoder, eager) and a zoo model's full-KV baseline match ``model.decode``, the outputs are
written where asked, and a zoo arch the graphs do not take yet is skipped with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.zoo_full_kv import FullBuffer, FullKVDecoder
from benchmarks.zoo_latency import QUICK, main, make_models, model_config, reference_logits, synthetic_cache


def test_dry_run_din_and_sim(tmp_path: Path) -> None:
    rc = main(["--device", "cpu", "--quick", "--archs", "din,sim", "--dtype", "both", "--out-dir", str(tmp_path)])
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} == {"zoo_latency_float16.json", "zoo_latency_float32.json",
                                                    "zoo_latency.md", "zoo_latency.png"}
    for dtype in ("float16", "float32"):
        res = json.loads((tmp_path / f"zoo_latency_{dtype}.json").read_text())
        assert res["dry_run"] and res["machine"]["device"] == "cpu" and "torch" in res["machine"]
        assert "--quick" in res["command"]
        rows = res["rows"]
        assert {(r["arch"], r["B"]) for r in rows} == {(a, b) for a in ("din", "sim") for b in (1, 3)}
        for r in rows:
            assert r["dtype"] == dtype and r["baseline_ok"] and r["baseline"]["median_ms"] > 0
            assert r["baseline_bytes_per_request"] > r["collective_bytes_per_request"] > 0
        for r in (r for r in rows if r["arch"] == "din"):  # the graphs take din (record format v1)
            assert r["collective_ok"] and r["speedup"] == pytest.approx(r["baseline"]["median_ms"]
                                                                        / r["collective"]["median_ms"])
        for r in (r for r in rows if r["arch"] == "sim"):
            assert r["collective_ok"] or ("skipped" in r["collective"] and r["collective_ok"] is None)
    table = (tmp_path / "zoo_latency.md").read_text()
    assert "CPU DRY RUN" in table and table.count("| sim |") == 4


@pytest.mark.parametrize("arch", ["eta", "sdim", "twin", "hstu"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_baseline_matches_decode(arch: str, dtype: str) -> None:
    """The full-KV baseline's decode over its one host buffer equals the full model's own decode."""
    cfg = model_config(arch, QUICK["long"] if arch != "hstu" else QUICK["lengths"][0], QUICK, 50)
    _, full_model = make_models(cfg, seed=0)
    cache = synthetic_cache(full_model, 3, dtype, 1, torch.device("cpu"))
    candidates = torch.tensor([[1, 7], [3, 3], [50, 2]])
    buf = FullBuffer(cache, candidates, dtype, cfg, pin=False, device=torch.device("cpu"))
    assert buf.host_bytes.numel() >= buf.nbytes
    buf.device_bytes.copy_(buf.host_bytes)
    with torch.no_grad():
        got = FullKVDecoder(full_model, dtype)(buf.views())
        want = reference_logits(full_model, cache, candidates)
    assert got.dtype == (torch.float16 if dtype == "float16" else torch.float32)
    assert (got.float() - want).abs().max() <= (2e-2 if dtype == "float16" else 1e-5)
