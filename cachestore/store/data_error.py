"""The error of bad input data, shared by the dataset schema (:mod:`pipeline.data.dataset_schema`) and the
item catalogue (:mod:`cachestore.store.catalogue`), which the schema builds on: both raise it, and the CLI
turns it into one line naming the file (and column) and what to do."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or a malformed canonical dataset; the message names file and column."""
