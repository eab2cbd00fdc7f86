"""The zoo latency benchmark (benchmarks/zoo_latency.py) end to end on CPU, tiny shapes: din's collective
path (GraphedDecoder, eager) and a zoo model's full-KV baseline match ``model.decode``, the outputs are
written where asked, and a zoo arch the graphs do not take is skipped with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import benchmarks.zoo_latency as zoo_latency
from benchmarks.zoo_full_kv import FullBuffer, FullKVDecoder
from benchmarks.zoo_latency import main
from benchmarks.zoo_synthetic import QUICK, make_models, model_config, reference_logits, synthetic_cache
from collectivekv.cachestore.decode.decode import decode_zoo, entry_cache
from collectivekv.cachestore.decode.transfer import to_device


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
        other = reference_logits(full_model, synthetic_cache(full_model, 3, dtype, 2, torch.device("cpu")), candidates)
    tol = 2e-3 if dtype == "float16" else 1e-5
    assert got.dtype == (torch.float16 if dtype == "float16" else torch.float32)
    assert (got.float() - want).abs().max() <= tol
    assert (other - want).abs().max() > 10 * tol  # the check tells caches apart


class _EagerZooGraph:
    """A stand-in for a GraphedDecoder that takes zoo layouts: the eager unpack + the model's decode."""

    def __init__(self, resident, layout, *, n_users: int, pad_to: int, n_candidates: int, eager: bool) -> None:
        assert eager and layout.arch != "din"
        self.resident, self.pad_to, self.candidates = resident, pad_to, None

    def run(self, host, candidates=None) -> torch.Tensor:
        if candidates is not None:
            self.candidates = torch.as_tensor(candidates)
        batch = to_device(host, "cpu")[0].unpack(self.pad_to)
        cache = entry_cache(batch, self.resident.cfg, self.resident.dtype)
        return decode_zoo(self.resident, cache, self.candidates)


def test_zoo_collective_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the graphs take a zoo layout, its rows carry timings, the speed-up and the check against the
    model's decode of the records (the stand-in above decodes them eagerly)."""
    monkeypatch.setattr(zoo_latency, "GraphedDecoder", _EagerZooGraph)
    rc = main(["--device", "cpu", "--quick", "--archs", "eta,hstu", "--dtype", "float16", "--candidates", "2",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "zoo_latency_float16.json").read_text())["rows"]
    assert [(r["arch"], r["B"], r["C"]) for r in rows] == [("eta", 1, 2), ("eta", 3, 2), ("hstu", 1, 2), ("hstu", 3, 2)]
    for r in rows:
        assert r["collective_ok"] and r["collective_max_abs_diff"] == 0.0
        assert r["speedup"] == pytest.approx(r["baseline"]["median_ms"] / r["collective"]["median_ms"])
        assert r["over_floor"] == pytest.approx(r["collective"]["median_ms"] / r["floor_ms"])
        assert r["over_bare_copy"] == pytest.approx(r["collective"]["median_ms"] / r["bare_copy_ms"])
        assert r["bare_copy_ms"] < r["floor_ms"]
