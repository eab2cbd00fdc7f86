"""The zoo models' fast serving path through the runtime and the CUDA graph body.

SIM, ETA, SDIM, TWIN and HSTU stores served with path "fused" (their Triton decode reading the packed
records in place: cachestore/decode/fused_zoo.py, cachestore/decode/fused_hstu.py) must score exactly as the eager
reference path (unpack + the model's own ``decode``), which tests/cachestore/decode/test_zoo_serving.py ties to
the training forward. On CPU the kernels run under Triton's interpreter (tests/conftest.py); the CUDA tests compile
them and capture the graphs, copying and zero-copy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collectivekv.cachestore.decode.decode import ResidentZooModel
from collectivekv.cachestore.decode.fused import INTERPRETED
from collectivekv.cachestore.decode.fused_config import FusedConfig
from collectivekv.cachestore.decode.graphs import GraphedDecoder
from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.publish import open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.model.zoo import PAPER_MODELS
from tests.cachestore.decode.zoo_serving_helpers import ORDER, STEP, STORES, VERSION
from tests.model.zoo_helpers import N_ITEMS, make_model

EXACT_POOLS = FusedConfig(pool_dtype="float32")  # the model's pool rows: the fused path == the eager one
# the CPU tests run the kernels under Triton's interpreter (set by tests/conftest.py where there is no GPU)
interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs Triton's CPU interpreter (a machine without a GPU)")


def candidates(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, N_ITEMS + 1, (len(ORDER), 2))  # two per user


@interpreted
@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_fused_runtime_scores_equal_the_eager_path(zoo_served: dict, arch: str) -> None:
    model = zoo_served[arch]["model"]
    cand = candidates(1)
    # every store kind: tests/cachestore/decode/test_fused_zoo.py, test_fused_hstu.py
    for mode, kv_dtype in [("collective", "float16")]:
        reader = StoreReader(open_current(zoo_served[arch]["stores"][mode, kv_dtype]))
        eager = DecodeRuntime(model, VERSION, reader, device="cpu", batch_users=STEP, path="gather")
        fused = DecodeRuntime(model, VERSION, reader, device="cpu", batch_users=STEP, path="fused",
                              fused_config=EXACT_POOLS)
        want, got = eager.score(ORDER, cand), fused.score(ORDER, cand)
        assert fused.fused and not eager.fused
        assert got.cold_start.tolist() == want.cold_start.tolist()
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5, err_msg=f"{arch} {mode} {kv_dtype}")


@interpreted
@pytest.mark.parametrize("arch", ["sim", "hstu"])
def test_store_precision_pools_stay_close(zoo_served: dict, arch: str) -> None:
    """The default launch reads the pool rows at the fp16 store's precision: scores within fp16 rounding."""
    model = zoo_served[arch]["model"]
    reader = StoreReader(open_current(zoo_served[arch]["stores"]["collective", "float16"]))
    cand = candidates(2)
    want = DecodeRuntime(model, VERSION, reader, device="cpu", batch_users=STEP, path="gather").score(ORDER, cand)
    got = DecodeRuntime(model, VERSION, reader, device="cpu", batch_users=STEP, path="fused").score(ORDER, cand)
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=2e-2)


@interpreted
@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_graph_body_of_a_zoo_model(zoo_served: dict, arch: str) -> None:
    """The body a CUDA graph captures (run eagerly here), on static buffers of a fixed step shape: cold padding
    slots and a batch shorter than the step score as the runtime's eager path."""
    model = zoo_served[arch]["model"]
    reader = StoreReader(open_current(zoo_served[arch]["stores"]["collective", "float32"]))
    rt = DecodeRuntime(model, VERSION, reader, device="cpu", batch_users=STEP, path="gather")
    ids = np.array(ORDER[:3])
    cand = candidates(3)[:3]
    want = rt.score(ids, cand).logits
    graph = GraphedDecoder(ResidentZooModel(model, "cpu"), reader.layout, n_users=STEP, pad_to=reader.layout.max_len,
                           n_candidates=2, path="fused", eager=True, fused=EXACT_POOLS)
    padded = np.zeros((STEP, 2), dtype=np.int64)
    padded[:3] = cand
    got = graph.run(rt.batcher.fetch(ids, n_slots=STEP), padded)[:3].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert graph.path == "fused" and not graph.flags.any()


def test_zoo_graph_refuses_poolscore(zoo_served: dict) -> None:
    model = zoo_served["eta"]["model"]
    layout = StoreReader(open_current(zoo_served["eta"]["stores"]["collective", "float32"])).layout
    with pytest.raises(ValueError, match="poolscore"):
        GraphedDecoder(ResidentZooModel(model, "cpu"), layout, n_users=2, pad_to=layout.max_len, path="poolscore",
                       eager=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_cuda_graphs_of_zoo_models(zoo_served: dict, arch: str) -> None:
    """On the GPU: the fused path without graphs, with CUDA graphs (copy) and with zero-copy graphs score as
    the CPU's eager path (TWIN: within the tolerance of its top-k ties, which the GPU may break differently)."""
    model = zoo_served[arch]["model"]
    cand = candidates(4)
    tol = 2e-3 if arch == "twin" else 1e-4
    for mode, kv_dtype in STORES:
        reader = StoreReader(open_current(zoo_served[arch]["stores"][mode, kv_dtype]))
        want = DecodeRuntime(model, VERSION, reader, device="cpu", batch_users=STEP, path="gather").score(ORDER, cand)
        for options in ({}, {"graphs": True}, {"graphs": True, "zero_copy": True}):
            gpu = make_model(model.cfg, seed=1).eval()
            rt = DecodeRuntime(gpu, VERSION, reader, device="cuda", batch_users=STEP, fused_config=EXACT_POOLS,
                               tier_bytes=0, **options)
            got = rt.score(ORDER, cand)
            assert rt.fused and got.cold_start.tolist() == want.cold_start.tolist()
            np.testing.assert_allclose(got.logits, want.logits, rtol=tol, atol=tol,
                                       err_msg=f"{arch} {mode} {kv_dtype} {options}")
            rt.close()
