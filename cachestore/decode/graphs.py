"""CUDA graphs for the decode of every model: one graph replay per batch, copy included.

At serving batch sizes the eager path (:func:`cachestore.decode.transfer.unpack_entry` +
:func:`cachestore.decode.decode.decode`) is bound by per-op CPU dispatch and kernel launches (~1.6 ms at every B on
an H100), not by bytes. For a fixed shape — n_users B, padded length L (``pad_to``), candidates per user C, buffer
capacity — the whole device side is shape-static and free of host syncs, so it is captured into
``torch.cuda.CUDAGraph``s over static tensors and replayed per request. The host-to-device copies are captured too
(H100, B 512, L 1000: 0.33 ms against 0.43 issued apart, ``decode_latency/decode_latency.json``):

    graph for (host buffer, copy size S):
      copy_start; static raw[:S] (device uint8) ← host buffer[:S] (pinned);
                  static candidates (B, C) ← pinned candidate staging (B, C); copy_end   (timing events)
      static_decode(raw, candidates) → the graph's logits (B, C)

    with ``overlap`` K > 1 (fused path; the model's default, :func:`copy_plan.default_overlap`) the batch in pieces
    [0, c1), [c1, c2), … (:func:`copy_chunks`) is copied on a forked stream, each piece followed by an event; the
    candidates are read from pinned memory by a kernel on the graph's stream (:func:`read_pinned`), their own work
    follows (query projections, retrieval targets; HSTU: its first layer's), and fused launch i, on a stream of its
    own, waits for event i and serves the users whose records end in piece i (:func:`record_ends`), so copying piece
    i + 1 overlaps decoding piece i; the streams join before the graph ends. A zoo model forks with one piece too.

A captured copy has a fixed source address and size, so there is one graph per (host buffer of the batcher's ring,
copy-size bucket): S is the smallest bucket >= used_bytes (:func:`copy_buckets`), capped at the host buffer's length.
Graphs are captured on first use and share one memory pool (one replays at a time, on one stream).

:func:`static_decode` is the captured body (it also runs eagerly on any device: the CPU tests compare it with the
runtime). Why it is static: L = ``pad_to`` and the zero block at 16·B are host-known; the unpack gathers read each
user's record at positions l < n_b and the zero block elsewhere, so bytes beyond the batch's used_bytes (copied
along from the host buffer's tail, or left from an earlier batch) are never read; masking is arithmetic on (B, L)
masks (no boolean indexing, ``nonzero`` or ``.item()``); ``decode``'s path choice depends on shapes only. Host-side
checks (batch size, longest history <= L, used_bytes <= capacity, a pinned host buffer) run before the replay.

Contract: replays run on the caller's current stream; the host buffer and the candidate staging are refilled only
after the replay that reads them (the batcher waits for the event :meth:`GraphedDecoder.run` marks; staging waits
for the previous replay); the returned logits tensor is the graph's static output and is overwritten by the next
replay of that graph (read or clone it first). Candidate ids must be valid items (0..n_items), checked on the host
by the caller (an out-of-range id is a device-side assert).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from collectivekv.cachestore.decode import copy_plan
from collectivekv.cachestore.decode.batch import HostBatch, zero_block_bytes
from collectivekv.cachestore.decode.capture import capturing, read_pinned
from collectivekv.cachestore.decode.copy_plan import batch_capacity, copy_buckets, copy_chunks, record_ends
from collectivekv.cachestore.decode.decode import PATHS, ResidentZooModel, choose_path
from collectivekv.cachestore.decode.fused import ALL_BYTES, DEFAULT_FUSED, FUSED, FusedConfig, uses_fused
from collectivekv.cachestore.decode.graph_inputs import BatchInputs, _Captured
from collectivekv.cachestore.decode.layer_batch import LayerBatch, capacities, header_bytes
from collectivekv.cachestore.decode.mapped import MappedBatch
from collectivekv.cachestore.decode.static_decode import static_decode, unpack_din
from collectivekv.cachestore.decode.transfer import TransferCost
from collectivekv.cachestore.store.entry import EntryLayout


class GraphedDecoder(BatchInputs):
    """Captured copy + unpack + decode for fixed (n_users B, pad_to L, n_candidates C, capacity) on CUDA.

    resident: the model on its CUDA device (``ResidentModel`` for din, :class:`ResidentZooModel` for the
    zoo); layout: the store's EntryLayout; path: "auto" ("fused" on CUDA with Triton, else resolved from the
    shapes, :func:`cachestore.decode.decode.choose_path`; a zoo model: "gather", its own eager decode), "fused",
    "poolscore" (din) or "gather"; a captured zoo graph needs "fused"; capacity: static buffer bytes (default
    :func:`batch_capacity`); fused: the fused kernel's launch settings (:class:`cachestore.decode.fused.FusedConfig`,
    e.g. fp16 pools). ``eager=True`` runs :func:`static_decode` on the same static buffers without a graph (any
    device; for tests).
    :meth:`run` scores a pinned :class:`HostBatch` (one replay: copies + decode); :attr:`last_cost` is the
    batch copy's :class:`TransferCost` (bytes moved, CUDA-event time inside the graph).
    overlap: on the fused path, the batch copy is split into up to ``overlap`` pieces (:func:`copy_chunks`:
    none under 256 KiB) copied on a forked stream inside the graph, and the kernels (din's attention, HSTU's first
    layer's history, the zoo's short and long stages) are launched once per piece for the users whose records end in
    it, right after that piece lands (an HSTU batch split by layer, :class:`cachestore.decode.layer_batch.LayerBatch`:
    its first buffer in the pieces, ``copy_plan.LAYER_OVERLAP`` by default, then its second); 1 turns it off; None: the
    default of the model and the store's kv dtype (:func:`copy_plan.default_overlap`: din and HSTU 3, the fastest or
    within 3% of it on an H100 at L 1000, ``decode_latency/decode_latency_overlap_store_float{16,32}.json``; the zoo's
    from ``benchmarks/zoo_overlap.py``).
    The candidates are read by a kernel, not copied: a copy of them could be queued behind the whole batch's (0.231
    vs 0.180 ms, fp16, B 512). concurrent (default True): each piece's launch on a stream of its own (forked after the
    candidates' work, joined before the MLP), so it need not wait for the previous launch's tail: B 512 0.309 → 0.289
    ms (fp32), 0.230 → 0.215 (fp16) (``decode_latency_concurrent_float{32,16}.json``); False: one after another on
    the graph's stream. Measured slower: separate graphs per user chunk, the kernel reading the pinned batch over PCIe
    (``decode_latency/decode_latency_nosplit.json``, ``decode_latency_mapped_*.json``); details in docs/serving.md.
    """

    def __init__(self, resident: ResidentZooModel, layout: EntryLayout, *, n_users: int, pad_to: int,
                 n_candidates: int = 1, capacity: int | None = None, path: str = "auto", warmup: int = 3,
                 eager: bool = False, fused: FusedConfig = DEFAULT_FUSED, overlap: int | None = None,
                 concurrent: bool = True) -> None:
        self.device = torch.device(resident.device)
        if not eager and (self.device.type != "cuda" or not torch.cuda.is_available()):
            raise RuntimeError(f"CUDA graphs need a CUDA device; the model is on {self.device}: "
                               "use the eager path (DecodeRuntime without graphs, or cachestore.decode.decode.decode)")
        self.zoo = resident.cfg.arch != "din"
        self.forks = self.zoo  # the zoo body's candidate work runs beside the copy
        if layout.arch != resident.cfg.arch or (not self.zoo and layout.flat_group is None):
            raise ValueError(f"the store holds {layout.arch!r} caches, the model is {resident.cfg.arch!r}")
        if self.zoo and path == "poolscore":
            raise ValueError(f"path 'poolscore' is the din model's attention, not {resident.cfg.arch!r}'s")
        if path not in (*PATHS, FUSED):
            raise ValueError(f"path must be one of {(*PATHS, FUSED)}, got {path!r}")
        default = copy_plan.default_overlap(resident.cfg.arch, layout.kv_dtype), copy_plan.LAYER_OVERLAP
        overlap, self.split_overlap = default if overlap is None else (overlap, overlap)  # split: a LayerBatch's first
        if overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {overlap}")
        if min(n_users, pad_to, n_candidates) < 1:
            raise ValueError(f"n_users, pad_to and n_candidates must be >= 1, got {n_users}, {pad_to}, {n_candidates}")
        self.resident, self.layout, self.eager, self.fused, self.overlap = resident, layout, eager, fused, overlap
        self.concurrent = concurrent
        self.n_users, self.pad_to, self.n_candidates = n_users, pad_to, n_candidates
        need = max(16 * n_users + zero_block_bytes(layout), capacities(layout, n_users, pad_to)[0])  # a split's first
        self.capacity = copy_plan.align8(max(capacity or batch_capacity(layout, n_users, pad_to), need))
        self.buckets = copy_buckets(self.capacity)
        self.last_cost: TransferCost | None = None
        self._graphs: dict[tuple[int, ...], _Captured] = {}  # (host buffer address(es), copy bytes) -> graph
        self._last: _Captured | None = None
        self._done: torch.cuda.Event | None = None  # after the latest replay: the staging may be refilled
        self._mapped_tables: list[torch.Tensor] = []  # the zero-copy graphs' static gather tables
        with torch.inference_mode():
            self.raw = torch.zeros(self.capacity, dtype=torch.uint8, device=self.device)
            head = torch.tensor([16 * n_users] * n_users + [0] * n_users, dtype=torch.int64)  # offsets, lengths
            self.raw[: 16 * n_users].copy_(head.view(torch.uint8))  # every user cold until the first batch
            self.candidates = torch.zeros(n_users, n_candidates, dtype=torch.int64, device=self.device)
            self.candidates_host = torch.zeros(n_users, n_candidates, dtype=torch.int64, pin_memory=not eager)
            self._candidates_np = self.candidates_host.numpy()
            self.flags = torch.zeros(n_users, dtype=torch.int32, device=self.device)  # static: per-user index flags
            path = FUSED if uses_fused(path, self.device) else path
            if self.zoo:
                self.path = "gather" if path == "auto" else path
                if not eager and self.path != FUSED:
                    raise ValueError(f"a CUDA graph of a {resident.cfg.arch} model needs its fused decode "
                                     "(Triton on the CUDA device)")
            else:
                self.path = path if path != "auto" else choose_path(
                    unpack_din(self.raw, layout, n_users, pad_to), n_candidates, resident)
            self.pieced = self.path == FUSED  # the launches follow the copy pieces
            self._split_buffers()  # HSTU's fused decode also reads batches split by layer
            self.logits = self._body()  # eager once: checks the body (and compiles the kernel)
            if not eager:
                self._pool = torch.cuda.graph_pool_handle()
                self._copy_stream = torch.cuda.Stream(self.device)  # the overlapped copies' branch of a graph
                self._capture_stream = torch.cuda.Stream(self.device)  # this decoder's captures (capturing())
                pieces = max(overlap, self.split_overlap) if concurrent else 0  # the piece launches' branches
                self._launch_streams = [torch.cuda.Stream(self.device) for _ in range(pieces)]
                self._warm_up(warmup)

    @property
    def n_graphs(self) -> int:
        """Graphs captured so far (one per host buffer and copy-size bucket used)."""
        return len(self._graphs)

    def _body(self, chunks: Sequence[tuple[int, int]] = ALL_BYTES, on_chunk: Callable[[int], None] | None = None,
              zero_flags: bool = True, rest: bool = False) -> torch.Tensor:
        """The decode (what a graph captures): ``flags`` zeroed (unless the caller's kernel did), then set for
        users with a router index outside the pool (read them after the replay: :attr:`flags`)."""
        if zero_flags:
            self.flags.zero_()
        return static_decode(self.raw, self.candidates, resident=self.resident, layout=self.layout,
                             n_users=self.n_users, pad_to=self.pad_to, path=self.path, fused=self.fused,
                             chunks=chunks, on_chunk=on_chunk, flags=self.flags, rest=self.rest if rest else None)

    def _warm_up(self, warmup: int, chunks: Sequence[tuple[int, int]] = ALL_BYTES, rest: bool = False) -> None:
        """Run the body on a side stream before a capture (lazy inits, cuBLAS workspaces, allocator, kernel
        compiles for these ``chunks``) over whatever the static buffers hold (always a valid batch)."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    self._body(chunks, rest=rest)
            current.wait_stream(side)
            torch.cuda.synchronize()

    def pieces(self, nbytes: int, split: bool = False) -> list[tuple[int, int]]:
        """Byte ranges a graph copying ``nbytes`` copies one by one (:func:`copy_chunks` with ``overlap``
        on the fused path; one range otherwise; ``split``: a LayerBatch's first buffer, in ``split_overlap``)."""
        if split:
            return copy_chunks(nbytes, header_bytes(self.n_users), self.split_overlap)
        return copy_chunks(nbytes, 16 * self.n_users, self.overlap if self.pieced else 1)

    def _capture(self, source: torch.Tensor, rest: torch.Tensor | None = None) -> _Captured:
        """One graph: copy ``source`` (pinned uint8 prefix of a host buffer) and the candidate staging
        into the static buffers between two timing events, then the body. With several copy pieces (or a zoo
        model's one) the batch is copied on a forked stream, piece by piece, and fused launch c
        waits for piece c only (a zoo body: its reads of the batch wait for the one piece)."""
        pieces = self.pieces(source.numel(), split=rest is not None)

        def move(on_piece: Callable[[int], None]) -> None:
            for i, (lo, hi) in enumerate(pieces):
                self.raw[lo:hi].copy_(source[lo:hi], non_blocking=True)
                on_piece(i)
            if rest is not None:  # a LayerBatch's later layers, after its first layer, beside that layer's attention
                self.rest[: rest.numel()].copy_(rest, non_blocking=True)
                on_piece(len(pieces))

        return self._record(pieces, move, source.numel() + (0 if rest is None else rest.numel()), rest is not None)

    def _record(self, pieces: list[tuple[int, int]], move: Callable[[Callable[[int], None]], None],
                nbytes: int, rest: bool = False) -> _Captured:
        """Capture a graph whose batch arrives in ``pieces`` (byte ranges of ``raw``): ``move(on_piece)`` issues the
        transfer of every piece in order (a copy, or the zero-copy gather), calling ``on_piece(i)`` after piece i,
        between two timing events. With several pieces, or ``forks`` (a zoo model), they move on a forked stream, the
        candidates are read by a kernel (:func:`read_pinned`), and launch c waits for piece c only."""
        ends = record_ends(pieces) if self.pieced else ALL_BYTES
        fork = len(pieces) > 1 or self.forks or rest
        if self.split is not None:  # the warm-up reads the static buffers, which may hold a batch of the other kind
            self._cold(split=rest)
        if len(pieces) > 1 or rest:
            self._warm_up(1, ends, rest)  # compiles the kernels for this launch size outside the capture
        read_pinned(self.candidates, self.candidates_host)  # compiled outside the capture too
        with torch.cuda.device(self.device):
            torch.cuda.current_stream().synchronize()
            start = torch.cuda.Event(enable_timing=True, external=True)
            end = torch.cuda.Event(enable_timing=True, external=True)
            graph = torch.cuda.CUDAGraph()
            with capturing(graph, self._pool, self._capture_stream):
                start.record()
                if not fork:
                    self.candidates.copy_(self.candidates_host, non_blocking=True)
                    move(lambda i: None)
                    end.record()
                    logits = self._body()
                else:
                    main, side = torch.cuda.current_stream(), self._copy_stream
                    side.wait_stream(main)  # fork: the pieces move beside the decode
                    arrived: list[torch.cuda.Event] = []  # the pieces' events (every transfer has a piece)

                    def landed(_: int) -> None:
                        arrived.append(torch.cuda.Event())
                        arrived[-1].record()

                    def issue() -> None:  # the pieces' transfers, captured once: when the body first reads the batch
                        if arrived:
                            return
                        with torch.cuda.stream(side):
                            move(landed)
                            end.record()

                    # the candidates by a kernel on main (read_pinned): a copy node may be queued behind the batch
                    read_pinned(self.candidates, self.candidates_host)
                    try:
                        logits = self._body(ends, self._launch_hook(main, arrived, issue, len(ends)), rest=rest)
                    finally:  # a failed launch must not leave a launch stream current
                        torch.cuda.set_stream(main)
                    issue()  # (a body that never read the batch)
                    main.wait_stream(side)  # join
        return _Captured(graph, logits, start, end, nbytes)

    def _launch_hook(self, main: torch.cuda.Stream, arrived: list[torch.cuda.Event], issue: Callable[[], None],
                     launches: int) -> Callable[[int], None]:
        """The launches' ``on_chunk``: the first call captures the pieces' transfers (``issue``; their nodes after the
        candidates' work, which a replay otherwise began ~30 µs late: docs/serving.md "Every model"); launch c waits
        for piece c's event, on ``main`` or (``concurrent``) on a stream of its own; ``on_chunk(launches)`` joins them
        and waits for the transfers no launch waited for (a LayerBatch's later layers)."""
        def hook(c: int) -> None:
            issue()
            if c == launches:  # after the last launch
                torch.cuda.set_stream(main)
                for stream in self._launch_streams[:launches]:  # none when launched on main
                    main.wait_stream(stream)
                for event in arrived[launches:]:
                    main.wait_event(event)
            elif not self.concurrent:
                main.wait_event(arrived[c])
            else:
                stream = self._launch_streams[c]
                stream.wait_stream(main)  # q and the workspaces, computed on main
                stream.wait_event(arrived[c])
                torch.cuda.set_stream(stream)
        return hook

    def check(self, host: HostBatch | MappedBatch) -> None:
        """Raise ValueError unless ``host`` fits this graph's static shapes (host-side only)."""
        if host.layout is not self.layout and host.layout != self.layout:
            raise ValueError("the batch was packed for another store layout than this graph's")
        split = isinstance(host, LayerBatch)
        if split and self.split is None:
            raise ValueError("a batch split by layer (LayerBatcher) is read by HSTU's fused path only: fetch with "
                             "HostBatcher")
        if split and host.rest_bytes > self.split_capacity[1]:
            raise ValueError(f"the batch's later layers need {host.rest_bytes} bytes; the graph's buffer holds "
                             f"{self.split_capacity[1]}")
        zero_at = header_bytes(self.n_users) if split else 16 * self.n_users
        if host.n_users != self.n_users or host.zero_offset != zero_at:
            raise ValueError(f"the batch has {host.n_users} users; this graph takes exactly {self.n_users} "
                             "(pad the batch with cold-start slots: HostBatcher.fetch(ids, n_slots=))")
        if host.max_length > self.pad_to:
            raise ValueError(f"pad_to {self.pad_to} < longest history in the batch ({host.max_length})")
        if host.used_bytes > self.capacity:
            raise ValueError(f"the batch needs {host.used_bytes} bytes; the graph's buffer holds {self.capacity}")
        if not self.eager and not host.pinned:
            raise ValueError("a captured copy reads pinned host memory: fetch with HostBatcher(pin=True) "
                             "or MappedBatcher(pin=True)")

    def copy_bytes(self, host: HostBatch) -> int:
        """Bytes the graph copies for ``host``: the smallest bucket >= used_bytes, capped at the host
        buffer's length (eager: exactly used_bytes; a LayerBatch: both buffers', :meth:`split_copy_bytes`)."""
        if isinstance(host, LayerBatch):
            return host.used_bytes + host.rest_bytes if self.eager else sum(self.split_copy_bytes(host))
        if self.eager:
            return host.used_bytes
        bucket = self.buckets[bisect.bisect_left(self.buckets, host.used_bytes)]
        return min(bucket, host.buffer.numel())

    def _stage(self, candidates: torch.Tensor | np.ndarray) -> None:
        """Write candidate ids (B, C) into the pinned staging the next replay copies (after the previous
        replay has read it)."""
        if self._done is not None:
            self._done.synchronize()
        cand = candidates if isinstance(candidates, np.ndarray) else torch.as_tensor(candidates).cpu().numpy()
        self._candidates_np[...] = cand.reshape(self.n_users, self.n_candidates)  # numpy: no torch dispatch

    def run(self, host: HostBatch | MappedBatch, candidates: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Score ``host`` (a pinned batch of exactly B users) against ``candidates`` (B, C) (host ids
        preferred; None: those of the previous call): one graph replay on the current stream (captured
        on first use of this host buffer and copy size). Returns the static logits (B, C), valid until
        that graph replays again; :attr:`last_cost` is the batch copy's cost. A :class:`MappedBatch`
        (zero-copy fetch) is gathered from the store's map inside the graph instead of copied
        (:meth:`_capture_mapped`); its cost is the header copy + the gather."""
        self.check(host)
        if candidates is not None:
            with torch.inference_mode():
                self._stage(candidates)
        if isinstance(host, MappedBatch):
            return self._run_mapped(host)
        if isinstance(host, LayerBatch):
            return self._run_split(host)
        if self.eager:
            return self._run_eager(lambda: self.raw[: host.used_bytes].copy_(host.tensor), host.used_bytes)
        # the request's latency runs from here: nothing before the replay but a lookup (H100, CUDA events
        # around the call: run() took 14-15 µs longer than the bare replay while it sliced the source and
        # entered inference mode on every call, 3-5 µs longer without)
        buffer = host.buffer
        nbytes = self.copy_bytes(host)
        key = (buffer.data_ptr(), nbytes)
        captured = self._graphs.get(key)
        if captured is None:
            with torch.inference_mode():
                captured = self._graphs[key] = self._capture(buffer[:nbytes])
        return self._replay(captured, host)

    def _run_eager(self, fill: Callable[[], object], nbytes: int, rest: bool = False) -> torch.Tensor:
        """Eager (no graph): ``fill()`` puts the batch into the static buffer (timed on the host), then the body."""
        with torch.inference_mode():
            t0 = time.perf_counter()
            fill()
            self.last_cost = TransferCost(nbytes, str(self.device), False, _seconds=time.perf_counter() - t0)
            self.candidates.copy_(self.candidates_host)
            self._rest_loaded = rest
            self.logits = self._body(rest=rest)
        return self.logits

    def replay(self) -> torch.Tensor:
        """Replay the latest graph again (the host buffer and candidate staging as they are now, copied
        again; eager: the body over the static buffers)."""
        if self.eager:  # the body over what the static buffers hold
            with torch.inference_mode():
                self.logits = self._body(rest=self._rest_loaded)
            return self.logits
        if self._last is None:
            raise RuntimeError("nothing to replay: call run(host, candidates) first")
        return self._replay(self._last, None)

    def _replay(self, captured: _Captured, host: HostBatch | MappedBatch | None) -> torch.Tensor:
        self._last = captured
        captured.graph.replay()
        done = torch.cuda.Event()
        done.record()
        self._done = done
        if host is not None:
            host.mark_copied(done)  # the batcher refills this host buffer only after the replay
        self.last_cost = None if captured.copy_start is None else TransferCost(
            captured.nbytes, str(self.device), True, captured.copy_start, captured.copy_end)
        self.logits = captured.logits
        return self.logits
