"""The zoo stores the decode tests serve (``zoo_served``): per zoo model, its collective model, USERS' histories
and one store per (mode, kv dtype) of STORES, built from the model's own prefill (tests/zoo_store_fixtures.py)."""

from __future__ import annotations

import pytest

from collectivekv.model.zoo import PAPER_MODELS
from tests.cachestore.decode.zoo_serving_helpers import STORES, USERS, VERSION, histories
from tests.model.zoo_helpers import make_model, zoo_config
from tests.zoo_store_fixtures import zoo_store_of_model


@pytest.fixture(scope="module")
def zoo_served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per arch: the collective model, USERS' histories and one store per (mode, kv dtype) of STORES."""
    out = {}
    for i, arch in enumerate(PAPER_MODELS):
        model = make_model(zoo_config(arch), seed=1).eval()
        hist = histories(model.cfg, seed=10 + i)
        stores = {}
        for mode, kv_dtype in STORES:
            root = tmp_path_factory.mktemp(f"{arch}-{mode}-{kv_dtype}")
            stores[mode, kv_dtype] = zoo_store_of_model(root, model, VERSION, USERS, *hist, mode, kv_dtype)
        out[arch] = {"model": model, "hist": hist, "stores": stores}
    return out
