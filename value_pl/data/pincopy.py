"""The copy of a training batch's region features into pinned memory, on several cores (``data.pin_threads``).

On a GPU run the DataLoader's pin thread copies each batch's features (and, packed after them, its other tensors) out
of the loader worker's reused shared buffer into pinned memory (:meth:`value_pl.data.handover.RingBatch.pin_memory`). torch runs that thread with one intra-op
thread (its pin loop calls ``torch.set_num_threads(1)``), so at batch 256 the ~38 MB of fp16 features are one core's
memcpy: ~4 ms at 10 GB/s, the largest part of the ~9 ms of CPU the main process spent per batch on the H200 host
(docs/performance.md), and every batch passes through that one thread. Here the pin thread raises its own intra-op
thread count to ``threads`` for that copy and sets it back after: ``Tensor.pin_memory()`` copies with
``Tensor.copy_``, which splits a large copy across the calling thread's intra-op (OpenMP) threads in C++. The copy is
one call that releases the GIL, as before, so no extra thread ever needs the GIL (the main thread, issuing the
training step in Python, holds it most of the time), and the pin thread re-acquires it once per batch, as before.

The count is thread-local (OpenMP's ``omp_set_num_threads``): the main thread's own intra-op threads are untouched.
``torch.set_num_threads`` also has process-wide effects, which last only until the count is set back: it records the
count for threads that start in between, sizes the thread pool of torch's quantized CPU kernels, and clears oneDNN's
cache of CPU primitives, which a GPU run's main thread does not use. A pair of calls, there and back, took 0.3 us on
the 2-core CPU.

Thread counts are kept per ring token (:func:`want`, set when the training stream is made); ``data.pin_threads=null``
picks :func:`auto_threads` from the cores this node gives each GPU. With one thread the copy is exactly torch's own.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

MAX_THREADS = 8

_THREADS: dict[str, int] = {}
_LOCK = threading.Lock()


def auto_threads(cores: int, ranks: int = 1) -> int:
    """``data.pin_threads=null``: a quarter of the cores each GPU's process has on this node, from 1 to 4 (16 cores,
    one GPU: 4). The loader workers, the main thread and its pin thread need the rest."""
    return max(1, min(4, (int(cores) // max(1, int(ranks))) // 4))


def check_threads(threads) -> int | None:
    """``data.pin_threads`` as an int (None stays None: chosen from the cores); a ValueError outside 1..MAX_THREADS."""
    if threads is None:
        return None
    if not 1 <= int(threads) <= MAX_THREADS:
        raise ValueError(f"data.pin_threads must be from 1 to {MAX_THREADS} (or null: chosen from the cores), "
                         f"got {threads}")
    return int(threads)


def want(token: str, threads: int) -> None:
    """Copy the features of ring ``token`` with ``threads`` threads (main process, when its stream is made)."""
    threads = check_threads(threads)
    with _LOCK:
        _THREADS[token] = threads


def threads(token: str) -> int:
    """The thread count of ring ``token`` (1: not set)."""
    return _THREADS.get(token, 1)


def forget(token: str) -> None:
    with _LOCK:
        _THREADS.pop(token, None)


@contextmanager
def intra_op_threads(n: int):
    """This thread's intra-op thread count set to ``n`` inside the block, and back after."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pinned(src: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """``src.pin_memory()``, its copy made with ``threads`` intra-op threads of the calling thread."""
    with intra_op_threads(max(1, int(threads))):
        return src.pin_memory()
