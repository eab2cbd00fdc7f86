"""The inputs of one `ckv data prepare` run, read as they come: an events file or an impression log (+ read
history), the item side-feature file, and the key schemes they are read with.

The key schemes (``--user-ids`` / ``--item-ids``) follow the catalogue the run extends (a day's data keys
users and items as the days before it did); a fresh run picks them from the data (pipeline/data/event_values.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from collectivekv.pipeline.data.event_values import EventLog, read_event_log, read_genres, resolve_id_mode
from collectivekv.pipeline.data.impressions import ImpressionOptions, read_impression_log

if TYPE_CHECKING:
    from collectivekv.cachestore.store.catalogue import ItemCatalogue

PrepareConfig = Any  # pipeline.data.prepare.PrepareConfig (which imports this module)


def impression_options(config: PrepareConfig, user_ids: str, item_ids: str) -> ImpressionOptions:
    return ImpressionOptions(
        user_col=config.user_col, time_col=config.time_col, shown_col=config.shown_col,
        clicked_col=config.clicked_col, labelled=config.labelled_impressions, list_sep=config.list_sep,
        item_col=config.item_col, history_user_col=config.history_user_col,
        history_item_col=config.history_item_col, history_time_col=config.history_time_col, sep=config.sep,
        user_ids=user_ids, item_ids=item_ids, time_unit=config.time_unit, time_format=config.time_format)


def read_log(config: PrepareConfig, previous: ItemCatalogue | None) -> EventLog:
    """The run's events, keyed with the schemes of ``previous`` (the catalogue it extends) when there is one."""
    where = "" if config.catalogue is None else f" ({config.catalogue})"
    user_ids = resolve_id_mode(config.user_ids, None if previous is None else previous.user_key, "--user-ids", where)
    item_ids = resolve_id_mode(config.item_ids, None if previous is None else previous.item_key, "--item-ids", where)
    if config.impressions is not None:
        return read_impression_log(config.impressions, config.history, impression_options(config, user_ids, item_ids))
    assert config.events is not None
    return read_event_log(config.events, user_ids=user_ids, item_ids=item_ids, **config.event_columns)


def read_pairs(config: PrepareConfig, log: EventLog) -> pd.DataFrame | None:
    """(item key, genre) pairs of the item side-feature file, keyed like the log's items; None without one."""
    if config.items is None:
        return None
    return read_genres(config.items, item_key=log.item_key, **config.item_columns)


def source_record(config: PrepareConfig, sha256: str) -> dict[str, Any]:
    """meta.json's "source": the input files and the sha256 of the main one (events or impressions)."""
    if config.impressions is not None:
        return {"events": None, "impressions": str(config.impressions),
                "history": None if config.history is None else str(config.history),
                "items": None if config.items is None else str(config.items), "sha256": sha256}
    return {"events": str(config.events), "items": None if config.items is None else str(config.items),
            "sha256": sha256}
