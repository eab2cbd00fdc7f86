"""The item catalogue: raw item id ↔ dense item id (and genre name ↔ genre id), persisted.

Dense item ids index the model's item embedding rows (1..n; 0 = padding); raw ids are the event
log's. ``ckv data prepare`` extends the previous catalogue (known items keep their dense ids, new
items are appended), every checkpoint carries the catalogue it was trained with, ``ckv refresh``
warm-starts by raw id (``pipeline/training/warm_start.py``) and serving maps raw request ids through it
(``cachestore/store/item_ids.py``). Torch-free.

File ``catalogue.parquet`` (pyarrow)::

    item_id int32   1..n in order
    raw_item int64  the raw id (key) of each dense id, all distinct
    raw_name string the item's text id, only when items are named by text (item_key "blake2b-63")
    schema metadata b"ckv_catalogue": JSON {"format": 1, "n_items": n, "genres": [names],
                                            "sha256": content hash, "item_key", "user_key"}

Genre id g (1..n_genres) is ``genres[g - 1]``. The content hash is sha256 of the format tag, the
raw ids as little-endian int64 and the genre names as JSON, then (only when either is not "int") the
key schemes and the text ids as JSON; a file whose content does not hash to its recorded sha256 (or to
the one a dataset's meta.json / a checkpoint's config.json records) is refused. A dataset or
checkpoint without a catalogue has the identity one (raw id = dense id).

Key schemes (``cachestore/store/user_keys.py``): ``item_key`` says how an item's raw id was made from the
event log's id ("int": the id itself; "blake2b-63": the hash of its text, kept in ``raw_name``);
``user_key`` likewise for users, so that everything trained from the dataset (checkpoints, stores)
keys users the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collectivekv.cachestore.store.data_error import DataError
from collectivekv.cachestore.store.item_ids import ItemIds, raw_to_dense
from collectivekv.cachestore.store.user_keys import INT, SCHEMES

CATALOGUE_FILE = "catalogue.parquet"
CATALOGUE_FORMAT = 1
METADATA_KEY = b"ckv_catalogue"
CATALOGUE_SCHEMA = pa.schema([("item_id", pa.int32()), ("raw_item", pa.int64())])
NAMED_SCHEMA = CATALOGUE_SCHEMA.append(pa.field("raw_name", pa.string()))


class CatalogueError(DataError):
    """A catalogue file that cannot be trusted (unreadable, wrong format, hash mismatch) or a bad id."""


@dataclass(frozen=True)
class ItemCatalogue:
    """``raw_items[d - 1]`` is the raw id of dense item id d (int64, distinct); ``genres[g - 1]`` the
    name of genre id g; ``names[d - 1]`` its text id when items are named by text (else None).
    ``item_key`` / ``user_key``: the key schemes of the data (module docstring). Immutable:
    :meth:`extend` returns a new catalogue."""

    raw_items: np.ndarray
    genres: tuple[str, ...] = ()
    names: tuple[str, ...] | None = None
    item_key: str = INT
    user_key: str = INT

    def __post_init__(self) -> None:
        raw = np.ascontiguousarray(self.raw_items, dtype=np.int64)
        raw.setflags(write=False)
        object.__setattr__(self, "raw_items", raw)
        object.__setattr__(self, "genres", tuple(str(g) for g in self.genres))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if len(np.unique(raw)) != len(raw):
            raise CatalogueError("item catalogue: raw item ids are not distinct")
        if len(set(self.genres)) != len(self.genres):
            raise CatalogueError("item catalogue: genre names are not distinct")
        for what, scheme in (("item_key", self.item_key), ("user_key", self.user_key)):
            if scheme not in SCHEMES:
                raise CatalogueError(f"item catalogue: {what} {scheme!r}, expected one of {SCHEMES}")
        if (self.names is not None) != (self.item_key != INT) or (self.names is not None and
                                                                   len(self.names) != len(raw)):
            raise CatalogueError(f"item catalogue: item_key {self.item_key!r} with "
                                 f"{'no' if self.names is None else len(self.names)} text ids for {len(raw)} items")

    @classmethod
    def identity(cls, n_items: int, genres: Iterable[str] = ()) -> ItemCatalogue:
        """The catalogue of data without one: raw id i = dense id i (1..n_items)."""
        return cls(np.arange(1, n_items + 1, dtype=np.int64), tuple(genres))

    @property
    def n_items(self) -> int:
        return len(self.raw_items)

    @property
    def sha256(self) -> str:
        """Content hash (module docstring)."""
        h = hashlib.sha256(f"ckv-item-catalogue/{CATALOGUE_FORMAT}\n".encode())
        h.update(self.raw_items.astype("<i8").tobytes())
        h.update(json.dumps(list(self.genres)).encode())
        if self.item_key != INT or self.user_key != INT:  # integer-keyed catalogues keep their earlier hash
            h.update(json.dumps({"item_key": self.item_key, "user_key": self.user_key,
                                 "names": list(self.names or ())}).encode())
        return h.hexdigest()

    def item_ids(self) -> ItemIds:
        """The serving lookup (raw → dense) of this catalogue."""
        return ItemIds.from_raw_items(self.raw_items, item_key=self.item_key)

    def to_dense(self, raw: np.ndarray, *, unknown: str = "error", where: str = "items") -> np.ndarray:
        """Dense ids of raw ids (any shape). ``unknown``: "error" (CatalogueError naming the first
        unknown id) or "zero" (unknown ids map to 0, the padding id)."""
        if unknown not in ("error", "zero"):
            raise ValueError(f"unknown must be 'error' or 'zero', got {unknown!r}")
        ids = self.item_ids()
        if unknown == "zero":
            return raw_to_dense(ids.sorted_raw, ids.dense, raw)[0]
        try:
            return ids.to_dense(raw, where=where)
        except ValueError as exc:
            raise CatalogueError(str(exc)) from exc

    def lookup(self, dense: np.ndarray) -> np.ndarray:
        """Raw ids of dense ids 1..n_items (any shape); CatalogueError for any other id."""
        d = np.asarray(dense, dtype=np.int64)
        bad = (d < 1) | (d > self.n_items)
        if bad.any():
            raise CatalogueError(f"dense item id {int(d[bad].reshape(-1)[0])} outside 1..{self.n_items}")
        return self.raw_items[d - 1]

    def genre_ids(self, names: Iterable[str]) -> np.ndarray:
        """Genre ids (1..n_genres) of genre names; CatalogueError for an unknown name."""
        index = {g: i + 1 for i, g in enumerate(self.genres)}
        try:
            return np.array([index[str(n)] for n in names], dtype=np.int64)
        except KeyError as exc:
            raise CatalogueError(f"genre {exc.args[0]!r} is not in the catalogue") from None

    def extend(self, new_raw_ids: Iterable[int] | np.ndarray, new_genres: Iterable[str] = (),
               names: tuple[np.ndarray, np.ndarray] | None = None) -> ItemCatalogue:
        """Append the raw ids (ascending) and genre names (sorted) not known yet; known ones keep their ids.

        ``names``: (keys, text ids) of items named by text (item_key "blake2b-63"), covering every new raw
        id; a key the catalogue holds under another text id is refused (two ids, one key)."""
        ids = new_raw_ids if isinstance(new_raw_ids, np.ndarray) else list(new_raw_ids)
        raw = np.unique(np.asarray(ids, dtype=np.int64))
        fresh = raw[~np.isin(raw, self.raw_items)]
        known = set(self.genres)
        genres = self.genres + tuple(sorted({str(g) for g in new_genres} - known))
        new_names = self.names
        if names is not None:
            new_names = _extend_names(self, fresh, names)
        elif self.names is not None and len(fresh):
            raise CatalogueError(f"item catalogue: {len(fresh)} new item(s) without text ids in a catalogue of "
                                 "items named by text")
        return ItemCatalogue(np.concatenate([self.raw_items, fresh]), genres, new_names, self.item_key,
                             self.user_key)

    def with_keys(self, item_key: str, user_key: str) -> ItemCatalogue:
        """This catalogue with the given key schemes (an empty one: a fresh catalogue for text ids)."""
        names = self.names if item_key != INT else None
        if item_key != INT and names is None:
            if self.n_items:
                raise CatalogueError(f"item catalogue of {self.n_items} integer ids cannot become {item_key!r}")
            names = ()
        return ItemCatalogue(self.raw_items, self.genres, names, item_key, user_key)

    def name_of(self, dense: np.ndarray) -> np.ndarray:
        """Text ids (object array) of dense ids; their raw ids as text when items are integers."""
        raw = self.lookup(dense)
        if self.names is None:
            return raw.astype(str).astype(object)
        return np.asarray(self.names, dtype=object)[np.asarray(dense, dtype=np.int64) - 1]

    def extends(self, base: ItemCatalogue) -> bool:
        """True when this catalogue numbers every item of ``base`` as ``base`` does (base is a prefix)."""
        n = base.n_items
        return n <= self.n_items and bool(np.array_equal(self.raw_items[:n], base.raw_items))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` atomically (a unique temp file beside it, then os.replace)."""
        path = Path(path)
        meta = {"format": CATALOGUE_FORMAT, "n_items": self.n_items, "genres": list(self.genres),
                "sha256": self.sha256, "item_key": self.item_key, "user_key": self.user_key}
        columns = [pa.array(np.arange(1, self.n_items + 1), pa.int32()), pa.array(self.raw_items, pa.int64())]
        if self.names is not None:
            columns.append(pa.array(self.names, pa.string()))
        schema = (CATALOGUE_SCHEMA if self.names is None else NAMED_SCHEMA).with_metadata(
            {METADATA_KEY: json.dumps(meta).encode()})
        table = pa.Table.from_arrays(columns, schema=schema)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _extend_names(cat: ItemCatalogue, fresh: np.ndarray, names: tuple[np.ndarray, np.ndarray]) -> tuple[str, ...]:
    """``cat``'s text ids followed by those of the ``fresh`` raw ids; CatalogueError when a given key is one the
    catalogue holds under another text id, or a fresh key has none."""
    keys = np.asarray(names[0], dtype=np.int64)
    texts = np.asarray(names[1], dtype=object)
    order = np.argsort(keys, kind="stable")
    keys, texts = keys[order], texts[order]
    if cat.n_items:
        pos, known = raw_to_dense(cat.item_ids().sorted_raw, cat.item_ids().dense, keys)
        held = np.asarray(cat.names or (), dtype=object)
        if held.size == 0:
            raise CatalogueError("item catalogue: items named by text cannot extend a catalogue of integer ids")
        clash = known & (held[np.maximum(pos, 1) - 1] != texts)
        if clash.any():
            i = int(np.flatnonzero(clash)[0])
            raise CatalogueError(f"item ids {str(texts[i])[:40]!r} and {str(held[pos[i] - 1])[:40]!r} (in the "
                                 f"catalogue) have the same key {int(keys[i])}: rename one of them")
    at = np.searchsorted(keys, fresh)
    ok = (at < len(keys)) & (keys[np.minimum(at, len(keys) - 1)] == fresh) if len(keys) else np.zeros(len(fresh), bool)
    if not np.all(ok):
        raise CatalogueError(f"item catalogue: new item key {int(fresh[~ok][0])} has no text id")
    return tuple(cat.names or ()) + tuple(str(t) for t in texts[at])


def check_same_numbering(model: ItemCatalogue | None, data_dir: str | os.PathLike) -> None:
    """Refuse a dataset directory whose dense item ids mean other items than the model's: its
    catalogue must extend the model's (None, or a directory without a catalogue: not checkable)."""
    path = Path(data_dir) / CATALOGUE_FILE
    if model is None or not path.is_file():
        return
    data = load_catalogue(path)
    if not data.extends(model):
        raise CatalogueError(f"{data_dir}: its item catalogue ({data.sha256[:12]}) numbers items differently from "
                             f"the model's ({model.sha256[:12]}), so its history item ids would point at other "
                             "items' rows: prefill the histories of the dataset the model was trained on (or of one "
                             "prepared with --catalogue <the checkpoint>)")


def load_catalogue(path: str | os.PathLike, *, expected_sha256: str | None = None) -> ItemCatalogue:
    """Read and check a catalogue file (format, columns, dense ids 1..n, content hash, and
    ``expected_sha256`` when the referring meta.json / config.json records one)."""
    path = Path(path)
    if path.is_dir():
        path = path / CATALOGUE_FILE
    what = "re-run `ckv data prepare` (or restore the file from the dataset it came from)"
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        detail = " ".join(str(exc).split())  # arrow messages span lines
        raise CatalogueError(f"{path}: unreadable item catalogue ({detail}); {what}") from None
    raw_meta = (table.schema.metadata or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw_meta) if raw_meta else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != CATALOGUE_FORMAT:
        raise CatalogueError(f"{path}: not an item catalogue of format {CATALOGUE_FORMAT} "
                             f"(metadata {str(meta)[:80]}); {what}")
    if table.schema.names not in (CATALOGUE_SCHEMA.names, NAMED_SCHEMA.names):
        raise CatalogueError(f"{path}: columns {table.schema.names}, expected {CATALOGUE_SCHEMA.names} "
                             f"(+ raw_name); {what}")
    item_id = table["item_id"].to_numpy()
    if not np.array_equal(item_id, np.arange(1, len(item_id) + 1)):
        raise CatalogueError(f"{path}: item_id is not 1..{len(item_id)}; {what}")
    try:
        names = tuple(table["raw_name"].to_pylist()) if "raw_name" in table.schema.names else None
        cat = ItemCatalogue(table["raw_item"].to_numpy(), tuple(meta.get("genres") or ()), names,
                            str(meta.get("item_key") or INT), str(meta.get("user_key") or INT))
    except CatalogueError as exc:
        raise CatalogueError(f"{path}: {exc}; {what}") from None
    for label, want in (("its recorded", meta.get("sha256")), ("the expected", expected_sha256)):
        if want is not None and cat.sha256 != want:
            raise CatalogueError(f"{path}: content hash {cat.sha256[:16]}… differs from {label} sha256 "
                                 f"{str(want)[:16]}… (file modified or mixed); {what}")
    return cat
