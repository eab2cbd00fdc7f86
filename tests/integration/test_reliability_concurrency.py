"""Readers scoring continuously while new store versions are published: no errors, no mixed-version
reads, no lost records (a short run of benchmarks/concurrent_serving.py; the full one writes
benchmarks/results/concurrent_serving/concurrent_serving.json)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from collectivekv.cachestore.store.entry import decode_entry, encode_entry

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("concurrent_serving", ROOT / "benchmarks" / "concurrent_serving.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_version_pattern_detects_a_mix() -> None:
    """The check the readers apply: a record of version k is recognised, a mixed one is not."""
    _, layout = bench.model_and_layout()
    n = 3

    def rec(kk: list[int]) -> object:
        arrays = {"kv": np.array(kk, np.float16)[:, None] + 1, "idx": np.array(kk, np.uint16)[:, None]}
        parts = [np.repeat(arrays[p.kind], p.width, axis=1) for p in layout.parts]  # k_user, v_user, k_idx, v_idx
        return decode_entry(layout, encode_entry(layout, n, parts))

    assert bench.record_version(rec([2, 2, 2])) == 2
    assert bench.record_version(rec([2, 2, 1])) is None


def test_readers_survive_publishes(tmp_path: Path) -> None:
    res = bench.run(tmp_path / "store", readers=3, publishes=2, users=300, batch=32, warmup_s=1.0,
                    interval_s=1.0, tail_s=1.0, work=tmp_path / "src")
    assert res["reader_exit_codes"] == [0, 0, 0]
    assert res["errors"] == 0, [r["error_samples"] for r in res["per_reader"]]
    assert res["mixed_version_reads"] == 0 and res["records_lost"] == 0
    assert res["batches"] > 100 and res["final_version_is_last_published"]
    for r in res["per_reader"]:  # every reader moved to the new versions, in order
        assert r["versions_seen"] == sorted(r["versions_seen"]) and r["versions_seen"][-1] == 2
    assert res["latency_ms"]["p99"] < 1000  # bounded (shared 2-core machine: generous)
