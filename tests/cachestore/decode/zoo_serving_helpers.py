"""Helpers shared by the zoo serving tests: the users, requests and store kinds they serve, USERS' histories, and
the references the runtime's scores are compared with (``model.forward`` on the batches the runtime steps through,
``model.decode`` on fp16-rounded or full-KV caches)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from collectivekv.model.blocks import ZooCache
from collectivekv.model.entry import full_cache
from tests.model.zoo_helpers import make_batch

VERSION = "0123456789abcdef"
OTHER = "fedcba9876543210"
USERS = list(range(100, 110))
STORES = [("collective", "float32"), ("collective", "float16"), ("full", "float32")]
# requests: stored users (one repeated) and two the store does not hold (cold start)
ORDER = [105, 100, 101, 7, 102, 103, 109, 104, 100, 106, 107, 108, 99999]
STEP = 4  # users per runtime step in the comparisons


def histories(cfg, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Histories of USERS: lengths 0, 1, the window and longer than it among them."""
    w = cfg.window_len
    g = np.random.default_rng(seed)
    lengths = [0, 1, w, w + 3, *g.integers(0, w + 4, len(USERS) - 4).tolist()]
    items, feedback, lens, _ = make_batch(lengths, w + 3, seed)
    return items, feedback, lens


def rows_of(order: list[int]) -> list[int | None]:
    return [u - USERS[0] if u in USERS else None for u in order]


def take(hist: tuple[torch.Tensor, ...], rows: list[int | None]) -> tuple[torch.Tensor, ...]:
    """Histories of these rows (None: an empty history, the cold-start user)."""
    items, feedback, lengths = hist
    zero = torch.zeros(1, items.shape[1], dtype=torch.long)
    it = torch.cat([items[r : r + 1] if r is not None else zero for r in rows])
    fb = torch.cat([feedback[r : r + 1] if r is not None else zero for r in rows])
    ln = torch.tensor([int(lengths[r]) if r is not None else 0 for r in rows])
    return it, fb, ln


def rounded(cache: ZooCache) -> ZooCache:
    """The cache with its user parts rounded through fp16, as an fp16 store holds them."""
    kv = {n: dataclasses.replace(c, k_user=c.k_user.half().float(), v_user=c.v_user.half().float())
          for n, c in cache.kv.items()}  # fmt: skip
    return dataclasses.replace(cache, kv=kv)


def reference(model, hist, rows: list[int | None], cand: np.ndarray, step: int, how: str = "forward") -> np.ndarray:
    """Logits on the batches the runtime steps through (chunks of ``step`` rows in request order):
    "forward" — ``model.forward``; "fp16" — ``model.decode`` on the fp16-rounded cache; "full" —
    ``model.decode`` on the full-KV cache."""
    out = []
    with torch.no_grad():
        for lo in range(0, len(rows), step):
            it, fb, ln = take(hist, rows[lo : lo + step])
            c = torch.from_numpy(cand[lo : lo + step])
            if how == "forward":
                out.append(model(it, fb, ln, c)[0])
                continue
            cache = model.prefill(it, fb, ln)
            cache = rounded(cache) if how == "fp16" else full_cache(model, cache)
            out.append(model.decode(cache, c))
    return torch.cat(out).numpy()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
