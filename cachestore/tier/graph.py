"""A resident request as one CUDA graph replay: user ids in a pinned buffer → scores, no record on the host.

:class:`ResidentRequest` drives a :class:`cachestore.decode.graphs.GraphedDecoder` (fixed B users, L = pad_to, C
candidates) whose batch buffer is the tier's arena itself (:mod:`cachestore.tier.arena`: the arena is a packed
batch whose records are the whole tier). Its captured graph is

    copy_start; in (2, B) int64 ← pinned host input; candidates (B, C) ← pinned staging
      whole store: one lookup kernel — binary search of in[0] (user ids, -1 = padding) in the sorted keys,
                   the request header (offsets | lengths) and present (B,) written, the zero block cleared
      cache mode:  in is the header itself (resolved on the host); copied to the arena's start
    copy_end; decode reading the records in place (fused kernel, or unpack + decode) → logits (B, C)
    logits and present (B,) → pinned host buffers

(the outputs are copied inside the graph: one replay and one synchronize per request). A whole-store
request moves 16·B bytes host → device and 4·B·C + B back; the host writes the ids and replays.
``eager`` decoders (CPU) run the same steps without a graph.
"""

from __future__ import annotations

import numpy as np
import torch

from collectivekv.cachestore.decode.batch import zero_block_bytes
from collectivekv.cachestore.decode.capture import capturing
from collectivekv.cachestore.decode.fused import FUSED
from collectivekv.cachestore.decode.graphs import GraphedDecoder, _Captured
from collectivekv.cachestore.tier.arena import write_header
from collectivekv.cachestore.tier.tier import WHOLE, ResidentTier


class ResidentRequest:
    """Static buffers and the captured graph of resident requests through ``decoder`` over ``tier``."""

    def __init__(self, decoder: GraphedDecoder, tier: ResidentTier) -> None:
        self.decoder, self.tier = decoder, tier
        b, c = decoder.n_users, decoder.n_candidates
        pin = not decoder.eager
        device = decoder.device
        if b > tier.batch_users:
            raise ValueError(f"a request of {b} users does not fit the tier's header area ({tier.batch_users} users)")
        self.host_in = torch.full((2, b), -1, dtype=torch.int64, pin_memory=pin)  # ids | -, or offsets | lengths
        self.dev_in = torch.full((2, b), -1, dtype=torch.int64, device=device)
        decoder.raw = tier.arena  # the decode reads the records where they lie
        self.zero = zero_block_bytes(tier.layout)
        self.present = torch.zeros(b, dtype=torch.bool, device=device)
        self.logits_host = torch.zeros(b, c, dtype=torch.float32, pin_memory=pin)
        self.present_host = torch.zeros(b, dtype=torch.bool, pin_memory=pin)
        self.flags_host = torch.zeros(b, dtype=torch.int32, pin_memory=pin)  # router index outside the pool
        # numpy views of the pinned buffers, made once: a request writes and reads them without a torch call
        self._in_np, self._logits_np = self.host_in.numpy(), self.logits_host.numpy()
        self._present_np, self._flags_np = self.present_host.numpy(), self.flags_host.numpy()
        self._captured: _Captured | None = None

    def _move(self) -> None:
        """Device steps before the decode: the request header into the arena (and present), graph-capturable."""
        d, tier = self.decoder, self.tier
        b = d.n_users
        if tier.mode == WHOLE:
            self.dev_in.copy_(self.host_in, non_blocking=not d.eager)
            write_header(tier.arena, self.dev_in[0], tier.keys, tier.offset, tier.length, self.present, tier.layout)
            return
        tier.arena[: 16 * b].view(torch.int64).copy_(self.host_in.view(-1), non_blocking=not d.eager)
        tier.arena[16 * b : 16 * b + self.zero].zero_()  # cache mode: present is known on the host

    def _capture(self) -> _Captured:
        """One graph for the whole request: inputs in (timed by two events), lookup, decode, outputs out. On the
        fused path the ids copy and the lookup run on a forked stream beside the candidates' own work (embedding,
        query projection: they read no record), which waits for the lookup only where the batch is first read
        (the body's ``on_chunk(0)``)."""
        d = self.decoder
        fork = d.path == FUSED
        with torch.cuda.device(d.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the lookup kernel and warms the body outside the capture
                self._move()
                d._body()
            torch.cuda.current_stream().wait_stream(side)
            side.synchronize()
            start = torch.cuda.Event(enable_timing=True, external=True)
            end = torch.cuda.Event(enable_timing=True, external=True)
            graph = torch.cuda.CUDAGraph()
            with capturing(graph, d._pool, d._capture_stream):
                main = torch.cuda.current_stream()
                start.record()
                side.wait_stream(main)
                with torch.cuda.stream(side if fork else main):
                    self._move()
                    end.record()
                found = torch.cuda.Event()
                found.record(side if fork else main)
                d.candidates.copy_(d.candidates_host, non_blocking=True)
                logits = d._body(on_chunk=lambda c: main.wait_event(found) if c == 0 else None)
                main.wait_stream(side)  # join (the body waited for the lookup already)
                self.logits_host.copy_(logits, non_blocking=True)  # D2H inside the graph: one replay per request
                self.present_host.copy_(self.present, non_blocking=True)
                self.flags_host.copy_(d.flags, non_blocking=True)
        return _Captured(graph, logits, start, end, self.host_in.numel() * 8)

    def run(self, first: np.ndarray, second: np.ndarray | None, candidates: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
        """Score one request: ``first`` (B,) the user ids (whole store; -1 for padding slots) or the arena
        offsets (cache mode, -1 = none) and ``second`` their behaviours (cache mode; None otherwise);
        ``candidates`` (B, C). Returns (logits (B, C) float32, present (B,) bool) as numpy (copies); the
        users whose record held a router index outside the pool: :meth:`bad_slots`."""
        d = self.decoder
        if d.eager or self._captured is None:
            with torch.inference_mode():
                return self._first_or_eager(first, second, candidates)
        # the request's latency runs from here: numpy writes into the pinned inputs, one replay, one wait
        d._stage(candidates)  # waits for the previous replay: the pinned inputs are free
        self._write_in(first, second)
        d._replay(self._captured, None)
        d._done.synchronize()
        present = self._present_np.copy() if second is None else first >= 0
        return self._logits_np.copy(), present

    def _write_in(self, first: np.ndarray, second: np.ndarray | None) -> None:
        if second is None:
            self._in_np[0] = first
        else:  # the header itself: cold users point at the zero block
            self._in_np[0] = np.where(first >= 0, first, 16 * self.decoder.n_users)
            self._in_np[1] = second

    def _first_or_eager(self, first: np.ndarray, second: np.ndarray | None, candidates: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`run` without a graph yet: eager on CPU, else capture it (first request) and replay."""
        d = self.decoder
        d._stage(candidates)
        self._write_in(first, second)
        if d.eager:
            logits = d._run_eager(self._move, self.host_in.numel() * 8)
            present = self.present.numpy().copy() if second is None else first >= 0
            self.flags_host.copy_(d.flags)
            return logits.float().numpy().copy(), present
        self._captured = self._capture()
        d._graphs[("resident", id(self.tier))] = self._captured  # counted in d.n_graphs
        d._replay(self._captured, None)
        d._done.synchronize()
        present = self._present_np.copy() if second is None else first >= 0
        return self._logits_np.copy(), present

    def bad_slots(self) -> np.ndarray:
        """Slots of the latest request whose record held a router index outside the pool (the kernel masked
        those loads; the caller must not return their scores)."""
        return np.flatnonzero(self._flags_np)
