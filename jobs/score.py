"""`ckv score`: score a file of requests offline through the serving runtime (cachestore/decode/runtime.py).

Input (Parquet or CSV, by extension; ``.csv`` / ``.csv.gz`` are CSV, anything else Parquet): one row
per (user, candidate item) — columns ``user_id`` and ``item_id`` (names set by --user-col /
--item-col), no nulls; every other column is passed through. Ids are the event log's raw ids: integers,
or text when the dataset keyed them by text (the checkpoint's ``user_key`` / ``item_key``, mapped with
``cachestore/store/user_keys.py`` exactly as ``ckv data prepare`` did). Item ids are mapped to the model's rows
through the checkpoint's item catalogue; an id the catalogue does not hold is an error naming its row
(nothing is written). ``--dense-ids`` takes the
model's dense ids instead (1..n_items; a checkpoint without a catalogue treats both alike). Output
(Parquet): the input rows in input order plus ``logit`` (float32), ``score`` (float32, sigmoid of the logit) and
``cold_start`` (bool: the user has no entry in the store and was scored with an empty history).

Rows are read in chunks (--chunk-rows), the next chunk on a reader thread while the current one is
scored (:func:`read_ahead`); within a chunk the candidates of one user are grouped into one request (at
most --max-candidates per slot; more take several slots) and scored in steps of --batch-size users, the
runtime fetching step n + 1 from LMDB while step n decodes (or reading the resident tier: --tier-bytes).
The serving options are ``jobs/serving_options.py``'s. A JSON summary (rows, users, cold-start users,
timings, tier hits and misses) goes to stdout.

Any store the runtime serves (din or a zoo arch: SIM, ETA, SDIM, TWIN, HSTU; collective or full-KV)
with the checkpoint it was prefilled with; zoo models ignore --path (their own attention; ``poolscore`` is refused).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from collectivekv.jobs.serving_options import serving_options

if TYPE_CHECKING:
    from collectivekv.cachestore.decode.runtime_config import ServingConfig

OUTPUT_COLUMNS = ("logit", "score", "cold_start")


def read_ahead(chunks: Iterator, depth: int = 1) -> Iterator:
    """The items of ``chunks``, read ``depth`` ahead on a thread: the next chunk of the file is read and parsed
    (Arrow releases the GIL) while the runtime scores the current one. An exception of the reader is raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in chunks:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # handed to the consumer, raised there
            q.put((done, exc))

    thread = threading.Thread(target=pump, name="ckv-score-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _is_csv(path: Path) -> bool:
    return path.name.lower().endswith((".csv", ".csv.gz"))


def read_requests(path: Path, user_col: str, item_col: str, chunk_rows: int,
                  text_cols: tuple[str, ...] = ()) -> Iterator:
    """Record batches of the requests file with the two id columns as int64 (``text_cols``: as strings, for ids
    keyed by text) (ClickException if not)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if _is_csv(path):
            types = {c: pa.string() if c in text_cols else pa.int64() for c in (user_col, item_col)}
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22),
                                    convert_options=pacsv.ConvertOptions(column_types=types))
            first = True
            for batch in reader:
                if first:
                    _check_columns(path, batch.schema.names, user_col, item_col)
                    first = False
                yield batch
            return
        pf = pq.ParquetFile(path, pre_buffer=False)  # streamed: memory bounded by one batch
        _check_columns(path, pf.schema_arrow.names, user_col, item_col)
        for batch in pf.iter_batches(batch_size=chunk_rows):
            yield batch
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise click.ClickException(f"{path}: cannot read requests: {exc}") from exc


def _check_columns(path: Path, names: list[str], user_col: str, item_col: str) -> None:
    for col in (user_col, item_col):
        if col not in names:
            raise click.ClickException(f"{path}: no column {col!r} (columns: {', '.join(names)})")
    clash = [c for c in OUTPUT_COLUMNS if c in names]
    if clash:
        raise click.ClickException(f"{path}: input already has output column(s) {clash}; rename them")


def _ids(batch, col: str, path: Path) -> np.ndarray:
    import pyarrow as pa

    arr = batch.column(col)
    if arr.null_count:
        raise click.ClickException(f"{path}: column {col!r} has null values")
    if not pa.types.is_integer(arr.type):
        raise click.ClickException(f"{path}: column {col!r} has type {arr.type}, expected integers")
    return arr.to_numpy()  # its own integer type: user_id_array checks the range before any cast


def _keys(batch, col: str, path: Path, scheme: str, rows_before: int) -> np.ndarray:
    """The int64 keys of a chunk's raw ids under a key scheme (cachestore/store/user_keys.py): integers as
    they are, text ids hashed; ClickException naming the row of a bad one."""
    from collectivekv.cachestore.store.user_keys import INT, UserKeyError, to_keys, user_id_array

    try:
        if scheme == INT:
            return user_id_array(_ids(batch, col, path), where=col)
        arr = batch.column(col)
        if arr.null_count:
            raise click.ClickException(f"{path}: column {col!r} has null values")
        return to_keys(arr.to_pylist(), scheme, where=col)
    except UserKeyError as exc:
        raise click.ClickException(f"{path}: (positions from row {rows_before + 1}) {exc}") from None


def _to_dense(catalogue, raw: np.ndarray, rows_before: int, item_col: str, path: Path, shown=None) -> np.ndarray:
    """Dense ids of a chunk's raw item ids (keys); ClickException naming the first unknown one's row (and its
    raw id as the file has it: ``shown``)."""
    from collectivekv.cachestore.store.item_ids import UnknownItemError

    try:
        return catalogue.to_dense(raw, where=str(path))
    except UnknownItemError as exc:
        value = exc.raw if shown is None else repr(str(shown[exc.position])[:40])
        raise click.ClickException(
            f"{path}: row {rows_before + exc.position + 1} (data rows from 1): {item_col} {value} is not in the "
            f"model's item catalogue ({len(catalogue)} items): drop the row, score it with a model that knows the "
            "item, or pass --dense-ids if the file holds dense ids") from None


def group_requests(users: np.ndarray, items: np.ndarray, max_candidates: int):
    """Rows → slots (one user, <= max_candidates candidates each). Returns (slot_user (S,),
    candidates (S, C) 0-padded, n_candidates (S,), slot of each row (N,), column of each row (N,))."""
    n = len(users)
    order = np.argsort(users, kind="stable")
    su = users[order]
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = su[1:] != su[:-1]
    group_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    rank = np.arange(n) - group_start
    boundary = new_user | (rank % max_candidates == 0)
    slot_sorted = np.cumsum(boundary) - 1
    col_sorted = rank % max_candidates
    n_slots = int(slot_sorted[-1]) + 1 if n else 0
    width = int(col_sorted.max()) + 1 if n else 1
    cand = np.zeros((n_slots, width), dtype=np.int64)
    cand[slot_sorted, col_sorted] = items[order]
    slot = np.empty(n, dtype=np.int64)
    col = np.empty(n, dtype=np.int64)
    slot[order], col[order] = slot_sorted, col_sorted
    return su[boundary], cand, np.bincount(slot_sorted, minlength=n_slots), slot, col


@click.command("score")
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="cache store root (serves its current version) or one version directory")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="checkpoint the store was prefilled with")
@click.option("--requests", "requests_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Parquet or CSV: one row per (user, candidate item)")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="output Parquet file")
@click.option("--user-col", default="user_id", show_default=True)
@click.option("--item-col", default="item_id", show_default=True)
@click.option("--max-candidates", default=256, show_default=True, help="candidates per user slot")
@click.option("--chunk-rows", default=1 << 16, show_default=True, help="request rows read at a time")
@click.option("--dense-ids", is_flag=True, help="item ids are the model's dense ids, not raw ids (no catalogue lookup)")
@serving_options(verify_crc=True)
def score(store: Path, checkpoint: Path, requests_path: Path, out: Path, user_col: str, item_col: str,
          max_candidates: int, chunk_rows: int, dense_ids: bool, config: ServingConfig) -> None:
    """Score a file of (user, candidate) requests against the cache store; writes Parquet."""
    from collectivekv.cachestore.checkpoint import CheckpointError
    from collectivekv.cachestore.decode.sharded import open_runtime
    from collectivekv.cachestore.store.publish import PublishError
    from collectivekv.cachestore.store.record import LayoutError, RecordError
    from collectivekv.pipeline.store.safe_output import OutputError, check_not_input, check_not_inside, replace_file

    if max_candidates < 1 or chunk_rows < 1:
        raise click.ClickException("--max-candidates and --chunk-rows must be >= 1")
    try:
        check_not_input(out, (requests_path,))  # before the runtime is opened
        check_not_inside(out, (store, checkpoint))
    except OutputError as exc:
        raise click.ClickException(str(exc)) from exc
    t0 = time.perf_counter()
    try:
        runtime = open_runtime(store, checkpoint, config)
    except (CheckpointError, LayoutError, RecordError, FileNotFoundError, PublishError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        keys = _key_schemes(runtime, checkpoint, dense_ids)
        with replace_file(out, inputs=(requests_path,)) as tmp:  # a unique temp file, os.replace on success
            rows, cold_rows, users, cold_users = _score_into(tmp, runtime, requests_path, user_col, item_col,
                                                             max_candidates, chunk_rows, dense_ids, keys)
    except OutputError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        runtime.close()
    summary = {"out": str(out), "rows": rows, "users": len(users), "cold_start_users": len(cold_users),
               "cold_start_rows": cold_rows, "store_version": runtime.version_id,
               "model_version": runtime.model_version, "item_ids": "dense" if dense_ids else "raw",
               "user_key": keys[0], "item_key": keys[1],
               "device": str(runtime.device), "path": config.path,
               "seconds": round(time.perf_counter() - t0, 3), "runtime": runtime.stats.as_dict()}
    click.echo(json.dumps(summary))


def _key_schemes(runtime, checkpoint: Path, dense_ids: bool) -> tuple[str, str]:
    """(user key scheme, item key scheme) of the model: the checkpoint's, which the store's manifest must
    agree with; the item scheme is "int" with --dense-ids."""
    from collectivekv.cachestore.store.user_keys import INT, read_key_scheme

    user_key = read_key_scheme(checkpoint)
    store_key = read_key_scheme(runtime.version_dir)
    if store_key != user_key:
        raise click.ClickException(f"{runtime.version_dir}: the store keys users by {store_key!r}, the "
                                   f"checkpoint {checkpoint} by {user_key!r}: score with the checkpoint the store "
                                   "was prefilled with")
    return user_key, INT if dense_ids else getattr(runtime.catalogue, "item_key", INT)


def _score_into(tmp: Path, runtime, requests_path: Path, user_col: str, item_col: str, max_candidates: int,
                chunk_rows: int, dense_ids: bool, keys: tuple[str, str] = ("int", "int")) -> tuple[int, int, set, set]:
    """Score every request chunk, writing the output Parquet to ``tmp``; (rows, cold rows, users, cold users).
    Item ids are raw (mapped through the runtime's catalogue) unless ``dense_ids``; ``keys``: the key schemes
    of user and item ids (text ids are hashed to their keys first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from collectivekv.cachestore.store.record import RecordError
    from collectivekv.cachestore.store.shards import WrongShardError
    from collectivekv.cachestore.store.store_check import StoreDamagedError

    rows, cold_rows, users, cold_users = 0, 0, set(), set()
    writer = None
    try:
        text_cols = tuple(c for c, k in zip((user_col, item_col), keys, strict=True) if k != "int")
        for batch in read_ahead(read_requests(requests_path, user_col, item_col, chunk_rows, text_cols)):
            u = _keys(batch, user_col, requests_path, keys[0], rows)
            it = _keys(batch, item_col, requests_path, keys[1], rows)
            if not dense_ids:
                shown = batch.column(item_col).to_pylist() if keys[1] != "int" else None
                it = _to_dense(runtime.catalogue, it, rows, item_col, requests_path, shown)
            elif len(it) and it.min() < 1:  # 0 is the padding item, never a candidate
                j = int(np.argmax(it < 1))
                raise click.ClickException(f"{requests_path}: row {rows + j + 1}: {item_col} {int(it[j])} is not a "
                                           "dense item id (1..n_items)")
            slot_user, cand, n_cand, slot, col = group_requests(u, it, max_candidates)
            try:
                res = runtime.score(slot_user, cand, n_cand)
            except (StoreDamagedError, RecordError) as exc:  # the store's fault, named by user
                raise click.ClickException(str(exc)) from exc
            except WrongShardError as exc:  # a user of a shard this run does not score: its file row
                row = rows + int(np.argmax(slot == exc.position)) + 1
                raise click.ClickException(f"{requests_path}: row {row}: user {exc.user_id} belongs to shard "
                                           f"{exc.owner} of {exc.count}; --shards selects "
                                           f"{','.join(map(str, exc.served))}") from None
            except ValueError as exc:
                raise click.ClickException(f"{requests_path}: {exc}") from exc
            logit = res.logits[slot, col].astype(np.float32)
            cold = res.cold_start[slot]
            table = pa.Table.from_batches([batch]).append_column("logit", pa.array(logit))
            table = table.append_column("score", pa.array((1.0 / (1.0 + np.exp(-logit))).astype(np.float32)))
            table = table.append_column("cold_start", pa.array(cold))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += len(u)
            cold_rows += int(cold.sum())
            users.update(np.unique(u).tolist())
            cold_users.update(np.unique(u[cold]).tolist())
        if writer is None:  # no rows: an empty file with the input's and the output columns
            schema = pa.schema([(c, pa.string() if c in text_cols else pa.int64()) for c in (user_col, item_col)])
            if not _is_csv(requests_path):
                schema = pq.read_schema(requests_path)
            schema = schema.append(pa.field("logit", pa.float32())).append(pa.field("score", pa.float32()))
            writer = pq.ParquetWriter(tmp, schema.append(pa.field("cold_start", pa.bool_())))
    finally:
        if writer is not None:
            writer.close()
    return rows, cold_rows, users, cold_users
