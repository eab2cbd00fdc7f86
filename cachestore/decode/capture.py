"""CUDA graph capture and streams for a process that serves while it loads: a capture that does not stall
other threads (:func:`capturing`) and a scope that puts a runtime's work on its own stream (:func:`on_stream`).

A server loads the next store version — its tier copied in, its graphs captured — while the current version
serves on other threads. ``torch.cuda.graph`` starts every capture with a device-wide synchronize and empties
the device and pinned-host caches (cudaFree, cudaFreeHost: each waits for all work on the device), and
anything on the default stream is queued behind whatever another thread put there; both show up as stalls in
the serving thread's requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Graphs are captured while other threads keep the device busy (a server loads the next store version and
# captures its graphs while the current one serves): only the capturing thread's calls may break a capture.
CAPTURE_MODE = "thread_local"


def on_stream(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """``torch.cuda.stream(stream)``: work issued inside goes to ``stream``; nothing changes for None (CPU)."""
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool: object, stream: torch.cuda.Stream) -> Iterator[None]:
    """Capture the work issued inside into ``graph`` on ``stream`` (forked from the current stream first).

    ``torch.cuda.graph`` without its entry steps: a device-wide synchronize and the release of every cached
    device block (cudaFree) and pinned host block (cudaFreeHost) — each of which stalls the work of every
    other thread, and a server captures the next version's graphs while the current one serves. The caller
    warms the body up before (allocations and kernel compiles happen outside the capture)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode=CAPTURE_MODE)
        try:
            yield
        finally:
            graph.capture_end()
