"""A resident request as one CUDA graph replay: user ids in a pinned buffer → scores, no record on the host.

:class:`ResidentRequest` drives a :class:`cachestore.decode.graphs.GraphedDecoder` (fixed B users, L = pad_to, C
candidates) whose batch buffer is the tier's arena itself (:mod:`cachestore.tier.arena`: the arena is a packed
batch whose records are the whole tier). Its captured graph is

      whole store: one lookup kernel — reads in[0] (user ids, -1 = padding) and the candidates (B, C) from
                   the pinned host inputs over PCIe, finds the ids in the keys (a range of the directory, then a
                   binary search inside it: :class:`cachestore.tier.arena.KeyIndex`), writes the request header
                   (offsets | lengths), present (B,) and the device candidates, zeroes the index flags and clears
                   the zero block
      cache mode:  in (2, B) int64 is the header itself (resolved on the host); copied to the arena's start,
                   the candidates copied in
    decode reading the records in place (fused kernel, or unpack + decode) → logits (B, C)
    one kernel writes logits, present (B,) and the index flags (B,) into pinned host buffers over PCIe

(no copy node on CUDA in whole-store mode: each copy node costs a few µs of graph scheduling beside the
kernels; one replay and one synchronize per request). A whole-store request moves 8·B(1 + C) bytes host →
device and 4·B·C + 5·B back; the host writes the ids and candidates with numpy, replays and waits.
``eager`` decoders (CPU) run the same steps without a graph.
"""

from __future__ import annotations

import numpy as np
import torch

from collectivekv.cachestore.decode.batch import zero_block_bytes
from collectivekv.cachestore.decode.capture import capturing
from collectivekv.cachestore.decode.graph_inputs import _Captured
from collectivekv.cachestore.decode.graphs import GraphedDecoder
from collectivekv.cachestore.tier.arena import write_header
from collectivekv.cachestore.tier.tier import WHOLE, ResidentTier

try:  # Triton is optional: CUDA machines have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

OUT_BLOCK = 1024  # outputs written per program of the out kernel


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
        """Device steps before the decode: the request's candidates and header into place (and present),
        graph-capturable. Whole store: one kernel reads the ids and candidates from the pinned inputs (no copy
        node), looks the ids up, writes the header and zeroes the decode's index flags
        (:func:`cachestore.tier.arena.write_header`)."""
        d, tier = self.decoder, self.tier
        b = d.n_users
        if tier.mode == WHOLE:
            write_header(tier.arena, self.host_in[0], tier.index, self.present, tier.layout,
                         candidates=(d.candidates_host, d.candidates), flags=d.flags)
            return
        d.candidates.copy_(d.candidates_host, non_blocking=not d.eager)
        tier.arena[: 16 * b].view(torch.int64).copy_(self.host_in.view(-1), non_blocking=not d.eager)
        tier.arena[16 * b : 16 * b + self.zero].zero_()  # cache mode: present is known on the host

    def _out(self, logits: torch.Tensor) -> None:
        """Logits, present and flags into the pinned outputs (inside the graph): on CUDA one kernel writing
        host memory over PCIe (no copy node), else three copies."""
        d = self.decoder
        flat = logits.reshape(-1)
        if flat.is_cuda and triton is not None:
            n = max(flat.numel(), d.n_users)
            _out_kernel[(triton.cdiv(n, OUT_BLOCK),)](flat, self.present, d.flags, self.logits_host, self.present_host,
                                                     self.flags_host, flat.numel(), d.n_users, BLOCK=OUT_BLOCK)
            return
        self.logits_host.copy_(logits, non_blocking=True)
        self.present_host.copy_(self.present, non_blocking=True)
        self.flags_host.copy_(d.flags, non_blocking=True)

    def input_bytes(self) -> int:
        """Bytes of the pinned inputs a request's graph reads: the ids (whole store) or the header (cache mode),
        and the candidates."""
        d = self.decoder
        return (8 if self.tier.mode == WHOLE else 16) * d.n_users + 8 * d.n_users * d.n_candidates

    def _capture(self) -> _Captured:
        """One graph for the whole request: inputs in, lookup, decode, outputs out. Untimed: an event recorded
        inside a graph costs its replay a few µs (the inputs are 8·B·(1 + C) bytes, 8·B more in cache mode; the
        runtime's h2d_ms stays 0)."""
        d = self.decoder
        whole = self.tier.mode == WHOLE  # the lookup kernel zeroes the flags
        with torch.cuda.device(d.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the kernels and warms the body outside the capture
                self._move()
                self._out(d._body(zero_flags=not whole))
            torch.cuda.current_stream().wait_stream(side)
            side.synchronize()
            graph = torch.cuda.CUDAGraph()
            with capturing(graph, d._pool, d._capture_stream):
                self._move()
                logits = d._body(zero_flags=not whole)
                self._out(logits)  # outputs written inside the graph: one replay per request
        return _Captured(graph, logits, None, None, self.input_bytes())

    def run(self, first: np.ndarray, second: np.ndarray | None, candidates: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
        """Score one request: ``first`` (B,) the user ids (whole store; -1 for padding slots) or the arena
        offsets (cache mode, -1 = none) and ``second`` their behaviours (cache mode; None otherwise);
        ``candidates`` (B, C). Returns (logits (B, C) float32, present (B,) bool) as numpy (copies); the
        users whose record held a router index outside the pool: :meth:`bad_slots`. The decoder's own replay
        state (``logits``, ``last_cost``) is not updated: read the results here."""
        d = self.decoder
        # the request's latency runs from here: numpy writes into the pinned inputs (free: the previous request
        # waited for its replay), one replay, one wait
        d._candidates_np[...] = np.asarray(candidates).reshape(d.n_users, d.n_candidates)
        self._write_in(first, second)
        if d.eager:
            with torch.inference_mode():
                logits = d._run_eager(self._move, self.input_bytes())
            self.flags_host.copy_(d.flags)
            present = self.present.numpy().copy() if second is None else first >= 0
            return logits.float().numpy().copy(), present
        if self._captured is None:  # the first request captures the graph, then replays it as every other
            with torch.inference_mode():
                self._captured = self._capture()
            d._graphs[("resident", id(self.tier))] = self._captured  # counted in d.n_graphs
        self._captured.graph.replay()
        torch.cuda.current_stream(d.device).synchronize()  # replay() ran on its device's current stream
        present = self._present_np.copy() if second is None else first >= 0
        return self._logits_np.copy(), present

    def _write_in(self, first: np.ndarray, second: np.ndarray | None) -> None:
        if second is None:
            self._in_np[0] = first
        else:  # the header itself: cold users point at the zero block
            self._in_np[0] = np.where(first >= 0, first, 16 * self.decoder.n_users)
            self._in_np[1] = second

    def bad_slots(self) -> np.ndarray:
        """Slots of the latest request whose record held a router index outside the pool (the kernel masked
        those loads; the caller must not return their scores)."""
        return np.flatnonzero(self._flags_np)


if triton is not None:

    @triton.jit
    def _out_kernel(logits_ptr, present_ptr, flags_ptr, logits_out, present_out, flags_out, N, B,
                    BLOCK: tl.constexpr):
        """logits_out[j] = logits[j] (j < N), present_out[j] = present[j] and flags_out[j] = flags[j] (j < B):
        the outputs may lie in pinned host memory (written over PCIe)."""
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(logits_out + j, tl.load(logits_ptr + j, mask=j < N), mask=j < N)
        tl.store(present_out + j, tl.load(present_ptr + j, mask=j < B), mask=j < B)
        tl.store(flags_out + j, tl.load(flags_ptr + j, mask=j < B), mask=j < B)
