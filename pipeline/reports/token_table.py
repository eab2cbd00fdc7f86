"""The token-table alternative to a per-user K/V cache, stated next to the full-KV and CollectiveKV stores.

In din and the target-attention zoo (SIM, ETA, SDIM, TWIN) a behaviour's token is its item, the item's
genres and the feedback, and every part these models cache — full K/V, CollectiveKV's user parts and
router indices, retrieval keys — is a function of the token alone (``model.cache_spec.token_only_reason``).
Such a model can be served without any per-user K/V: a store of each user's **token ids** (2 bytes per
behaviour while the vocabulary of items × feedbacks fits uint16, else 4) and a **token table** on the GPU
with one row per token holding what the store would have cached for it. The scores are the same (the
decode gathers the rows it would have read from the records). What decides between the three:

- the token table must fit in GPU memory: vocabulary × the bytes of one token's row (the full model's
  K/V, or CollectiveKV's parts + its pools);
- it cannot exist when cached parts depend on the event, not only on its token — HSTU's contextual layers,
  or per-event features (time gaps, context) — and then CollectiveKV's per-user store is what compresses.

:func:`token_table` computes, for one model config and one user base, the token-id store's bytes and CR
and both tables' GPU bytes, and says which layout a deployment should choose within a GPU budget.
"""

from __future__ import annotations

from typing import Any

from collectivekv.model.cache_spec import (
    group_specs,
    store_config,
    token_id_itemsize,
    token_only_reason,
    token_row_bytes,
    token_vocabulary,
)
from collectivekv.model.config import ModelConfig

RECORD_HEADER = 32  # bytes before a record's payload, the same for a token-id record


def pool_bytes(cfg: ModelConfig) -> int:
    """GPU bytes of CollectiveKV's global pools at fp32: per group and shared side, pool × (d_a − d_u)."""
    groups = group_specs(store_config(cfg, "collective"))
    rows = sum(int(g.k_shared) * (cfg.d_attn - g.dk) + int(g.v_shared) * (cfg.d_attn - g.dv) for g in groups)
    return rows * cfg.collective.pool_size * 4


def token_table(cfg: ModelConfig, *, users: int, behaviours: int, kv_itemsize: int = 2,
                full_fp32_bytes: float | None = None, collective_store_bytes: float | None = None,
                gpu_budget_bytes: float = 80 * 2**30) -> dict[str, Any]:
    """The token-table alternative for ``users`` users caching ``behaviours`` behaviours in all.

    ``full_fp32_bytes``: the same behaviours' full K/V at fp32 (the CR denominator);
    ``collective_store_bytes``: the CollectiveKV store's payload, for the comparison. Returns
    ``{"applies": False, "reason": …}`` for a model with contextual parts, else the sizes and a ``choice``."""
    reason = token_only_reason(cfg)
    if reason is not None:
        return {"applies": False, "reason": reason}
    vocab = token_vocabulary(cfg)
    id_size = token_id_itemsize(vocab)
    payload = behaviours * id_size
    tables = {"full": vocab * token_row_bytes(cfg, "full", kv_itemsize),
              "collective": vocab * token_row_bytes(cfg, "collective", kv_itemsize) + pool_bytes(cfg)}
    out: dict[str, Any] = {
        "applies": True, "vocabulary": vocab, "event_codes": (cfg.n_feedback - 1) // 2, "token_id_bytes": id_size,
        "kv_itemsize": kv_itemsize,
        "store_payload_bytes": payload, "store_record_bytes": payload + users * RECORD_HEADER,
        "per_user_bytes": payload / users if users else 0.0,
        "cr": payload / full_fp32_bytes if full_fp32_bytes else None,
        "gpu_table_bytes": tables, "gpu_budget_bytes": gpu_budget_bytes,
        "vs_collective_store": (payload / collective_store_bytes) if collective_store_bytes else None,
    }
    out["choice"] = _choice(out)
    return out


def _choice(t: dict[str, Any]) -> str:
    """Which layout to deploy, and why, for the sizes in ``t``."""
    full, coll, budget = t["gpu_table_bytes"]["full"], t["gpu_table_bytes"]["collective"], t["gpu_budget_bytes"]
    if full <= budget:
        return (f"token ids + full-KV token table: the full model's exact K/V from a {fmt_gib(full)} table per GPU "
                f"and {t['token_id_bytes']} B per behaviour in the store (no per-user K/V to cache)")
    if coll <= budget:
        return (f"token ids + CollectiveKV token table: the full table ({fmt_gib(full)}) exceeds the GPU budget "
                f"({fmt_gib(budget)}); CollectiveKV's rows and pools take {fmt_gib(coll)}")
    return (f"CollectiveKV per-user store: neither token table fits the GPU budget ({fmt_gib(budget)}; full "
            f"{fmt_gib(full)}, CollectiveKV {fmt_gib(coll)})")


def fmt_gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def token_lines(t: dict[str, Any]) -> list[str]:
    """The alternative as a few lines of text (the size report, the HTML report, ``ckv capacity``)."""
    if not t["applies"]:
        return [f"token-table alternative: does not apply — {t['reason']}"]
    cr = "-" if t["cr"] is None else f"{t['cr']:.3%}"
    vs = "" if t["vs_collective_store"] is None else f" ({t['vs_collective_store']:.1%} of the CollectiveKV store)"
    codes = t.get("event_codes", 1)
    token = "item, genres, feedback" + (f" and one of {codes:,} per-event codes" if codes > 1 else "")
    return [
        f"token-table alternative (every cached part is a function of the behaviour's token: {token}; "
        f"{t['vocabulary']:,} tokens):",
        f"  token-id store: {t['token_id_bytes']} B per behaviour, {t['per_user_bytes']:,.1f} B per user, "
        f"CR {cr}{vs}",
        f"  GPU token table: full K/V {fmt_gib(t['gpu_table_bytes']['full'])}, CollectiveKV "
        f"{fmt_gib(t['gpu_table_bytes']['collective'])} (rows + pools), at {t['kv_itemsize']} B per value",
        f"  choose: {t['choice']}",
    ]
