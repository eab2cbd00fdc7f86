"""A captured graph (`_Captured`) and the batches that reach one other than as one pinned copy: methods of
:class:`cachestore.decode.graphs.GraphedDecoder` (a mixin) for a :class:`cachestore.decode.layer_batch.LayerBatch`
(two pinned buffers: the first layer's records, copied in the decoder's pieces, then the later layers', copied beside
the first layer's attention) and a :class:`cachestore.decode.mapped.MappedBatch` (gathered from the store's registered
map inside the graph)."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from collectivekv.cachestore.decode.copy_plan import copy_buckets, record_ends
from collectivekv.cachestore.decode.layer_batch import LayerBatch, capacities, header_bytes, split_layouts
from collectivekv.cachestore.decode.mapped import MappedBatch, gather_records


@dataclass
class _Captured:
    """One captured graph of a GraphedDecoder: the graph, its static logits, its copy-timing events and bytes."""

    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (B, C) the graph's static output
    copy_start: torch.cuda.Event | None  # recorded inside the graph around its copies (None: not timed)
    copy_end: torch.cuda.Event | None
    nbytes: int  # bytes its batch copy moves


class BatchInputs:
    """GraphedDecoder's runs of a LayerBatch and of a MappedBatch (it provides the attributes these read)."""

    def _split_buffers(self) -> None:
        """Where the decode reads batches split by layer (HSTU's fused path): both buffers' capacities and copy-size
        buckets (the first buffer goes to ``raw``; the second's static buffer ``rest`` is made by the first such
        batch); ``split`` None elsewhere."""
        self.split = split_layouts(self.layout) if self.pieced else None
        self.split_capacity = capacities(self.layout, self.n_users, self.pad_to)
        self.split_buckets = tuple(copy_buckets(c) if self.split else [] for c in self.split_capacity)
        self.rest: torch.Tensor | None = None
        self._rest_loaded = False  # the static buffers hold a LayerBatch (an eager replay reads it so)

    def _cold(self, split: bool) -> None:
        """Static buffers whose header says every user is cold, as a batch split by layer or not: what a capture's
        warm-up reads (:meth:`_record`: it runs the body over whatever the buffers hold, maybe the other kind)."""
        n = self.n_users
        words = [header_bytes(n)] * n + [0] * (3 * n) if split else [16 * n] * n + [0] * n
        self.raw[: len(words) * 8].copy_(torch.tensor(words, dtype=torch.int64).view(torch.uint8))

    def split_copy_bytes(self, host: LayerBatch) -> tuple[int, int]:
        """Bytes the graph copies of each buffer of ``host``: its smallest bucket holding the batch, capped at the
        buffer's length."""
        sizes = (host.used_bytes, host.rest_bytes)
        return tuple(min(b[bisect.bisect_left(b, used)], source.numel())
                     for b, used, source in zip(self.split_buckets, sizes, (host.buffer, host.rest), strict=True))

    def _run_split(self, host: LayerBatch) -> torch.Tensor:
        """A LayerBatch: one graph per (its two buffers, their copy-size buckets): the first buffer in the pieces,
        the second after them (:meth:`_capture`)."""
        if self.rest is None:
            self.rest = torch.zeros(self.split_capacity[1], dtype=torch.uint8, device=self.device)
        if self.eager:
            def fill() -> None:
                self.raw[: host.used_bytes].copy_(host.tensor)
                self.rest[: host.rest_bytes].copy_(host.rest_tensor)
            return self._run_eager(fill, host.used_bytes + host.rest_bytes, rest=True)
        rest = host.rest
        nbytes, rest_bytes = self.split_copy_bytes(host)
        key = (host.buffer.data_ptr(), nbytes, rest.data_ptr(), rest_bytes)
        captured = self._graphs.get(key)
        if captured is None:
            with torch.inference_mode():
                captured = self._graphs[key] = self._capture(host.buffer[:nbytes], rest[:rest_bytes])
        return self._replay(captured, host)

    def _run_mapped(self, batch: MappedBatch) -> torch.Tensor:
        if self.eager:
            return self._run_eager(lambda: gather_records(batch, self.raw), batch.pcie_bytes)
        buffer = batch.buffer
        span = self.buckets[bisect.bisect_left(self.buckets, batch.used_bytes)]  # bytes the pieces cut
        key = (buffer.data_ptr(), -span * 8 - batch.unit)  # negative: apart from the copy graphs' keys
        captured = self._graphs.get(key)
        if captured is None:
            with torch.inference_mode():
                captured = self._graphs[key] = self._capture_mapped(batch, span)
        captured.nbytes = batch.pcie_bytes  # what this batch moves (the graph's copy events time it)
        return self._replay(captured, batch)

    def _capture_mapped(self, batch: MappedBatch, span: int) -> _Captured:
        """One graph for a zero-copy batch's pinned buffer (and gather word, and bucket ``span`` of its size):
        the header and gather table copied and the records gathered from the registered LMDB map
        (:func:`cachestore.decode.mapped.gather_records`, records of up to ``pad_to`` behaviours) in the byte
        ranges a copy of ``span`` bytes would be split into (:meth:`_record`: beside the decode on the fused
        path with ``overlap`` K; each gather launch serves the records ending in its range)."""
        pieces = self.pieces(span)
        ends = record_ends(pieces)
        table = torch.zeros(3, self.n_users, dtype=torch.int64, device=self.device)  # static gather table
        self._mapped_tables.append(table)  # alive as long as the graph
        with torch.cuda.device(self.device):
            batch.store_map.source(batch.unit, self.device)  # registers the map before the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the gather for this bound outside the capture
                gather_records(batch, self.raw, table, self.pad_to)
            torch.cuda.current_stream().wait_stream(side)

        def move(on_piece: Callable[[int], None]) -> None:
            gather_records(batch, self.raw, table, self.pad_to, ends, on_piece)

        return self._record(pieces, move, batch.pcie_bytes)
