"""Paper-shape zoo models with random weights and synthetic full-history caches, for the zoo latency
benchmark (``zoo_latency.py``) and its test.

Shapes (:data:`PAPER`): embed 64, d_a 256, 8 heads, d_u 1, pool 10,000, topk 50, 18 genres (1 to 3 per
item: SIM's category bitmasks), HSTU 2 layers; din and hstu cache L = max_len behaviours, sim/eta/sdim/twin
a short window of 50 and a long window of L (long_len). :data:`QUICK`: tiny shapes for the CPU dry run.
"""

from __future__ import annotations

import dataclasses

import torch

from collectivekv.cachestore.decode.transfer import KV_TORCH
from collectivekv.model.blocks import ZooCache
from collectivekv.model.cache import KVCache
from collectivekv.model.cache_spec import group_specs
from collectivekv.model.config import LONG_ARCHS, CollectiveConfig, ModelConfig
from collectivekv.model.entry import user_scales
from collectivekv.model.zoo import create_model

PAPER = {"embed_dim": 64, "d_attn": 256, "n_heads": 8, "d_user": 1, "pool_size": 10_000, "topk": 50,
         "n_genres": 18, "max_genres": 3, "hstu_layers": 2, "short": 50, "lengths": (50, 1000), "long": 1000}
QUICK = {"embed_dim": 16, "d_attn": 32, "n_heads": 4, "d_user": 1, "pool_size": 10_000, "topk": 4,
         "n_genres": 6, "max_genres": 2, "hstu_layers": 2, "short": 4, "lengths": (8,), "long": 12}
N_ITEMS = 100_000


def model_config(arch: str, length: int, shape: dict, n_items: int, half: bool = False) -> ModelConfig:
    """The benchmark's config of ``arch`` caching ``length`` behaviours (long archs: the long window);
    ``half``: "half the cache" at CR <= 0.2% (one joint K/V router index, int8 user parts; SIM / ETA / SDIM keyed by
    their router index, SIM and SDIM over 65,536 index values, SDIM with 2 hash functions: docs/model_zoo.md)."""
    long = arch in LONG_ARCHS
    options: dict = {"kv_index": "joint", "user_dtype": "int8", "retrieval_keys": "pool"} if half else {}
    if half and arch == "sdim":
        options["sdim_hashes"] = 2
    pool = 65_536 if half and arch in ("sim", "sdim") else shape["pool_size"]
    return ModelConfig(**options, n_items=n_items, n_genres=shape["n_genres"], max_genres=shape["max_genres"],
                       embed_dim=shape["embed_dim"], d_attn=shape["d_attn"], n_heads=shape["n_heads"],
                       max_len=shape["short"] if long else length, long_len=max(length, shape["short"]),
                       arch=arch, topk=shape["topk"], hstu_layers=shape["hstu_layers"],
                       collective=CollectiveConfig(d_user=shape["d_user"], pool_size=pool))


def make_models(cfg: ModelConfig, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(collective model, full-KV model) with random weights and item genres (1..max_genres of n_genres per
    item; item 0 none); HSTU's relative-position biases non-zero so positions matter; int8 user parts (half
    cache) a scale of 1/32 (codes of +-127 give N(0, 1)-sized parts)."""
    g = torch.Generator().manual_seed(seed)
    genres = torch.randint(1, cfg.n_genres + 1, (cfg.n_items + 1, cfg.max_genres), generator=g)
    genres[:, 1:] *= torch.rand(cfg.n_items + 1, cfg.max_genres - 1, generator=g) < 0.5  # 1..max_genres each
    genres[0] = 0
    models = []
    for mode in ("collective", "full"):
        torch.manual_seed(seed)
        m = create_model(dataclasses.replace(cfg, kv_mode=mode), genres).eval()
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("rel_bias"):
                    p.normal_(0.0, 0.5, generator=g)
            for name, b in m.named_buffers():
                if name.endswith("user_scale"):
                    b.fill_(1 / 32)
        models.append(m)
    return models[0], models[1]


def synthetic_cache(model: torch.nn.Module, n_users: int, kv_dtype: str, seed: int, device: torch.device
                    ) -> ZooCache:
    """Full histories of ``n_users`` users in ``model``'s cache form (din too: one group "kv"): N(0, 1) K/V
    parts rounded to ``kv_dtype`` (held as fp32; int8 parts: uniform codes × the model's scale), uniform router
    indices (one per row for a joint index), and the retrieval keys of random items computed by the model itself
    (``retrieval_keys``)."""
    cfg, n = model.cfg, model.cfg.window_len
    g = torch.Generator(device=device).manual_seed(seed)
    lengths = torch.full((n_users,), n, dtype=torch.int64, device=device)

    scales = user_scales(model, cfg)

    def values(rows: int, width: int, part: str) -> torch.Tensor:
        if part in scales:  # int8 codes × the branch's scale, exactly as the store holds them
            codes = torch.randint(-127, 128, (n_users, rows, width), generator=g, device=device)
            return codes.float() * scales[part]
        x = torch.randn(n_users, rows, width, generator=g, device=device)  # (B, R, width)
        return x.to(KV_TORCH[kv_dtype]).float()

    def index(rows: int, shared: bool) -> torch.Tensor | None:
        return torch.randint(0, cfg.collective.pool_size, (n_users, rows), generator=g, device=device) if shared \
            else None

    kv = {}
    for s in group_specs(cfg):
        rows = min(n, s.cap)
        k_idx = index(rows, s.k_shared)
        v_idx = k_idx if s.joint else index(rows, s.v_shared)
        kv[s.name] = KVCache(values(rows, s.dk, f"{s.name}.k_user"), values(rows, s.dv, f"{s.name}.v_user"),
                             k_idx, v_idx, lengths.clamp(max=s.cap))
    keys = {}
    if cfg.arch in LONG_ARCHS:
        items = torch.randint(1, cfg.n_items + 1, (n_users, n), generator=g, device=device)
        keys = model.retrieval_keys(items, lengths)
    return ZooCache(lengths=lengths, kv=kv, keys=keys)


def head(cache: ZooCache, b: int) -> ZooCache:
    """The first ``b`` users of a cache."""
    kv = {n: KVCache(*(None if t is None else t[:b] for t in (c.k_user, c.v_user, c.k_idx, c.v_idx, c.lengths)))
          for n, c in cache.kv.items()}
    return ZooCache(lengths=cache.lengths[:b], kv=kv, keys={n: k[:b] for n, k in cache.keys.items()})


def reference_logits(model: torch.nn.Module, cache: ZooCache, candidates: torch.Tensor) -> torch.Tensor:
    """``model.decode`` (fp32) of a cache; din decodes its one group's :class:`KVCache`."""
    return model.decode(cache.kv["kv"] if model.cfg.arch == "din" else cache, candidates)
