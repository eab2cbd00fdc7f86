"""A resident request as one CUDA graph replay: user ids in a pinned buffer → scores, no record on the host.

:class:`ResidentRequest` drives a :class:`cachestore.graphs.GraphedDecoder` (fixed B users, L = pad_to, C
candidates) over a :class:`cachestore.tier.tier.ResidentTier`. Its captured graph is

    copy_start; in (2, B) int64 ← pinned host input; candidates (B, C) ← pinned staging
      whole store: src, n = searchsorted of in[0] (user ids, -1 = padding) in the tier's sorted keys
      cache mode:  src, n = in[0], in[1] (arena offsets and behaviours, resolved on the host)
      raw[: 16·B] ← header from (src, n); records gathered arena → raw (device-to-device); copy_end
    decode (fused kernel or unpack + decode) → logits (B, C)

and after the replay the logits and the ``present`` mask (B,) come back in two copies to pinned host
buffers. So a whole-store batch moves 16·B bytes host → device and 4·B·C + B back, and the host's work per
request is writing the ids and one replay (the lookup belongs inside the graph: ~55 µs for 512 ids in 20M
keys with numpy on one core, a few µs of device work). ``eager`` decoders (CPU tests) run the same steps
without a graph.
"""

from __future__ import annotations

import numpy as np
import torch

from cachestore.graphs import GraphedDecoder, _Captured
from cachestore.tier.arena import build_batch, lookup
from cachestore.tier.tier import WHOLE, ResidentTier


class ResidentRequest:
    """Static buffers and the captured graph of resident requests through ``decoder`` over ``tier``."""

    def __init__(self, decoder: GraphedDecoder, tier: ResidentTier) -> None:
        self.decoder, self.tier = decoder, tier
        b, c = decoder.n_users, decoder.n_candidates
        pin = not decoder.eager
        device = decoder.device
        self.host_in = torch.full((2, b), -1, dtype=torch.int64, pin_memory=pin)  # ids | -, or src | n
        self.host_in[1] = 0
        self.dev_in = self.host_in.to(device)
        self.table = torch.zeros(3, b, dtype=torch.int64, device=device)
        self.present = torch.zeros(b, dtype=torch.bool, device=device)
        self.logits_host = torch.zeros(b, c, dtype=torch.float32, pin_memory=pin)
        self.present_host = torch.zeros(b, dtype=torch.bool, pin_memory=pin)
        self._captured: _Captured | None = None

    def _move(self) -> None:
        """Device steps before the decode: the input copy, the lookup and the batch build (graph-capturable)."""
        d, tier = self.decoder, self.tier
        self.dev_in.copy_(self.host_in, non_blocking=not d.eager)
        if tier.mode == WHOLE:
            src, n = lookup(self.dev_in[0], tier.keys, tier.offset, tier.length)
        else:
            src, n = self.dev_in[0], self.dev_in[1]
        build_batch(d.raw, src, n, tier.arena, tier.layout, d.pad_to, table=self.table)
        self.present.copy_(src >= 0)

    def _capture(self) -> _Captured:
        d = self.decoder
        with torch.cuda.device(d.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the gather for this bound outside the capture
                self._move()
            torch.cuda.current_stream().wait_stream(side)

        def move(on_piece) -> None:
            self._move()
            on_piece(0)

        return d._record([(0, d.capacity)], move, self.host_in.numel() * 8)

    def run(self, first: np.ndarray, second: np.ndarray | None, candidates: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
        """Score one request: ``first`` (B,) the user ids (whole store; -1 for padding slots) or the arena
        offsets (cache mode, -1 = none) and ``second`` their behaviours (cache mode; None otherwise);
        ``candidates`` (B, C). Returns (logits (B, C) float32, present (B,) bool) as numpy (copies)."""
        d = self.decoder
        with torch.inference_mode():
            d._stage(candidates)  # waits for the previous replay: the pinned inputs are free
            self.host_in[0].numpy()[:] = first
            if second is not None:
                self.host_in[1].numpy()[:] = second
            if d.eager:
                logits = d._run_eager(self._move, self.host_in.numel() * 8)
                return logits.float().numpy().copy(), self.present.numpy().copy()
            if self._captured is None:
                self._captured = self._capture()
                d._graphs[("resident", id(self.tier))] = self._captured  # counted in d.n_graphs
            logits = d._replay(self._captured, None)
            self.logits_host.copy_(logits, non_blocking=True)
            self.present_host.copy_(self.present, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
        return self.logits_host.numpy().copy(), self.present_host.numpy().copy()
