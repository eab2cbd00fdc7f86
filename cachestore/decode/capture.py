"""CUDA graph capture and streams for a process that serves while it loads: a capture that does not stall
other threads (:func:`capturing`), streams of its own for the thread that serves (:func:`own_streams`), and a
second stream for work that can run beside the rest of a decode (:func:`beside`), and a kernel copy from pinned host
memory for the few bytes a graph needs first (:func:`read_pinned`).

A server loads the next store version — its tier copied in, its graphs captured — while the current version
serves on other threads. ``torch.cuda.graph`` starts every capture with a device-wide synchronize and empties
the device and pinned-host caches (cudaFree, cudaFreeHost: each waits for all work on the device), and
anything on the default stream is queued behind whatever another thread put there; both show up as stalls in
the serving thread's requests.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import torch

from collectivekv.cachestore.decode.fused import tl, triton

# Graphs are captured while other threads keep the device busy (a server loads the next store version and
# captures its graphs while the current one serves): only the capturing thread's calls may break a capture.
CAPTURE_MODE = "thread_local"
_SIDE = threading.local()  # per thread: {device: its second stream}


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


def own_streams(devices: Iterable[torch.device]) -> None:
    """Make a new stream the calling thread's current stream on each CUDA device of ``devices`` (others are
    ignored): work the thread issues from then on never queues behind what other threads put on a device's
    default stream. Set once per thread, not per request: a ``torch.cuda.stream`` block runs Python each time."""
    for device in {torch.device(d) for d in devices}:
        if device.type == "cuda":
            torch.cuda.set_stream(torch.cuda.Stream(device))


def beside(device: torch.device, lane: int = 0) -> tuple[torch.cuda.Stream | None, torch.cuda.Stream | None]:
    """(the current stream, a second stream of ``device`` that has waited for it) on CUDA — work issued on the second
    runs beside what follows on the first until the first waits for it (inside a CUDA graph: two branches) — and
    (None, None) elsewhere. One such stream per thread, device and ``lane`` (work on two lanes runs beside each other
    too; a capture in one thread never meets another thread's work on it), made on the thread's first call (an eager
    one: the graphs run their body once before capturing it). Every tensor the side work reads must stay referenced
    until the join."""
    if device.type != "cuda":
        return None, None
    streams = _SIDE.__dict__.setdefault("streams", {})
    if (device, lane) not in streams:
        streams[device, lane] = torch.cuda.Stream(device)
    main, side = torch.cuda.current_stream(device), streams[device, lane]
    side.wait_stream(main)
    return main, side


if triton is not None:

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + at, tl.load(src_ptr + at, mask=at < n), mask=at < n)


def read_pinned(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst`` (contiguous, CUDA) ← ``src`` (contiguous, pinned host memory, same dtype and size) by a kernel whose
    loads cross PCIe, not by the copy engine: in a CUDA graph it cannot queue behind a large copy on another branch
    (a few KB: as fast as a small memcpy, and the work that needs them is not held up behind the batch's copy).
    Without Triton, or off CUDA: ``dst.copy_(src)``."""
    if triton is None or dst.device.type != "cuda" or dst.numel() == 0:
        dst.copy_(src, non_blocking=True)
        return
    flat, into = src.reshape(-1), dst.reshape(-1)
    _copy_kernel[(-(-flat.numel() // 1024),)](flat, into, flat.numel(), BLOCK=1024, num_warps=4)
