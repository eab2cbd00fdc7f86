"""Reading an Arrow IPC stream body with its sizes checked before any buffer is decompressed.

An IPC stream may compress its buffers (LZ4 frame or ZSTD): a 24 KiB body of zeros can ask for gigabytes once
decoded, before any per-request limit sees a row. :func:`read_stream` reads the stream message by message
(``pyarrow.ipc.MessageReader``) and, for every record batch, reads its metadata — the flatbuffer ``Message`` →
``RecordBatch`` table (Arrow's ``format/Message.fbs``): the row count, the ``buffers`` vector and whether a
``compression`` field is present — and the uncompressed length each compressed buffer carries in its first 8 bytes
(the IPC format's rule; -1: stored uncompressed). The batch is decoded only if the rows of all batches so far stay
within the request's user limit and their uncompressed bytes within :func:`max_decoded_bytes`; otherwise a
413 naming the body. Dictionary batches are refused (no column of a score request is dictionary-encoded).

The flatbuffer reader is the few lines needed for those fields: a table is an int32 offset back to its vtable
(uint16 sizes, then one uint16 offset per field, 0 = absent), a field of a table or vector type an uint32 offset
forward from where it is stored; every read is bounds-checked (``struct.error`` → 400).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from collectivekv.cachestore.serving.errors import BadRequest

if TYPE_CHECKING:
    import pyarrow as pa

_MESSAGE_HEADER, _BATCH_LENGTH, _BATCH_BUFFERS, _BATCH_COMPRESSION = 2, 0, 2, 3  # field numbers (Message.fbs)
_TEXT_ID_BYTES = 4 * 256 + 4  # a text user id of at most 256 characters in UTF-8, and its offset


def max_decoded_bytes(max_users: int, max_candidates: int) -> int:
    """The most bytes a request of at most ``max_users`` users × ``max_candidates`` candidates decodes to: per user a
    text id (or an int64) and its list of int64 candidates with their offsets, plus 1 MiB for bitmaps and padding."""
    return max_users * (_TEXT_ID_BYTES + 8 + 8 * max_candidates) + (1 << 20)


def _field(buf: bytes, table: int, field: int) -> int | None:
    """Absolute position of ``field`` of the flatbuffer table at ``table`` in ``buf``; None when absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vtable_size = struct.unpack_from("<H", buf, vtable)[0]
    slot = 4 + 2 * field
    if slot + 2 > vtable_size:
        return None
    offset = struct.unpack_from("<H", buf, vtable + slot)[0]
    return table + offset if offset else None


def _batch_sizes(metadata: bytes, body: bytes) -> tuple[int, int]:
    """(rows, decoded bytes) of a record batch message from its flatbuffer metadata and its body."""
    root = struct.unpack_from("<I", metadata, 0)[0]
    at = _field(metadata, root, _MESSAGE_HEADER)
    if at is None:
        raise struct.error("a record batch message without its header")
    batch = at + struct.unpack_from("<I", metadata, at)[0]
    length = _field(metadata, batch, _BATCH_LENGTH)
    rows = struct.unpack_from("<q", metadata, length)[0] if length is not None else 0
    compressed = _field(metadata, batch, _BATCH_COMPRESSION) is not None
    at = _field(metadata, batch, _BATCH_BUFFERS)
    total = 0
    if at is not None:
        vector = at + struct.unpack_from("<I", metadata, at)[0]
        for k in range(struct.unpack_from("<I", metadata, vector)[0]):
            offset, size = struct.unpack_from("<qq", metadata, vector + 4 + 16 * k)
            if compressed and size >= 8:
                decoded = struct.unpack_from("<q", body, offset)[0]  # -1: this buffer is stored as is
                total += size if decoded < 0 else decoded
            else:
                total += size
    return rows, total


def read_stream(body: bytes, max_users: int, max_candidates: int) -> pa.Table:
    """The table of an Arrow IPC stream ``body`` (module docstring); BadRequest 400 for a body that is not one,
    413 for one that decodes past a request of ``max_users`` users × ``max_candidates`` candidates."""
    import pyarrow as pa

    cap = max_decoded_bytes(max_users, max_candidates)
    try:
        reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(body))
        schema = pa.ipc.read_schema(reader.read_next_message())
        batches, rows, decoded = [], 0, 0
        for message in reader:
            if message.type != "record batch":
                raise BadRequest("body", f"holds a {message.type} message: send plain columns (no dictionaries)",
                                 400)
            n, size = _batch_sizes(message.metadata.to_pybytes(), message.body.to_pybytes()
                                   if message.body is not None else b"")
            rows, decoded = rows + n, decoded + size
            if rows > max_users or decoded > cap:
                raise BadRequest("body", f"decodes to more than {max_users} users or {cap} bytes "
                                 f"({rows} rows, {decoded} bytes so far): split the request", 413)
            batches.append(pa.ipc.read_record_batch(message, schema))
        return pa.Table.from_batches(batches, schema)
    except BadRequest:
        raise
    except (pa.ArrowException, OSError, StopIteration, struct.error, ValueError, IndexError) as exc:
        raise BadRequest("body", f"is not an Arrow IPC stream ({type(exc).__name__}: {str(exc)[:120]})",
                         400) from None
