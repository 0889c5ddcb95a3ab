"""Ring buffers page-locked with CUDA, lent to the host-to-device copy (``data.register_buffers``; on by default).

On one H200, end-to-end training read 0-8% more samples/s with it than without (10 paired runs), the GPU busy 1-8
points more (docs/performance.md). Without the switch, the DataLoader's pin thread copies each training batch's
features out of the loader worker's reused shared buffer into pinned memory
(:meth:`value_pl.data.handover.RingBatch.pin_memory`): at batch 256, ~38 MB per batch, most of the main process's CPU
time per batch. With it, the main process registers every ring buffer with CUDA as page-locked memory once, when the
buffer's segment first arrives (:func:`register`, ``cudaHostRegister``), and pinning *lends* the buffer's view itself
(:func:`lend`: no copy). The host-to-device copy then reads the features straight out of the buffer,
asynchronously (registered memory counts as pinned: ``is_pinned()`` is True). The buffer is handed back to its worker
only once that copy has completed:

* the transfer (:func:`to_device`, which ``ProbeModule.transfer_batch_to_device`` uses) calls :func:`moved` after
  each non-blocking copy; for a lent view it records a CUDA event on the current stream and queues (event, buffer);
* each later transfer first calls :func:`release_completed`, which frees the buffers whose events have completed;
* :func:`release` (loader teardown, :func:`value_pl.data.handover.forget`) waits for the queued events and frees
  all; a forgotten or retired buffer is unregistered (``cudaHostUnregister``) after that, never while read;
* a lent view dropped without being transferred (a loader shut down mid-epoch, an exception) frees its buffer when
  it is collected: no copy was issued from it.

CUDA's caching host allocator does not track foreign registered memory, hence the events. Every CUDA call goes
through :data:`CUDA` (tests swap in fakes). A failed registration is logged once, with CUDA's error, and turns
registration off in this process: later batches take the copy path. Each ring's counts (registered buffers,
zero-copy and copy-path batches, fallbacks to one-off segments, the registration error) are in :func:`stats`;
training reports them in results.json (``throughput.ring_buffers``).
"""
from __future__ import annotations

import logging
import mmap
import threading
import weakref

import torch

from . import packing

log = logging.getLogger(__name__)
PAGE = mmap.PAGESIZE
_tls = threading.local()


def fence() -> None:
    """A full memory barrier between a payload access and a buffer-flag write (release then acquire of a held
    lock); x86 keeps that order anyway, weaker memory models (ARM) need it."""
    lock = getattr(_tls, "lock", None)
    if lock is None:
        lock = _tls.lock = threading.Lock()
        lock.acquire()
    lock.release()
    lock.acquire()


def free(flag: torch.Tensor) -> None:
    """Mark a ring buffer free: its worker may write it again."""
    fence()
    flag[0] = 0


class CudaCalls:
    """The CUDA calls of this module. ``register``/``unregister`` return None, or what went wrong (never raise)."""

    def register(self, ptr: int, size: int) -> str | None:
        return self._call("cudaHostRegister", ptr, size, 0)

    def unregister(self, ptr: int) -> str | None:
        return self._call("cudaHostUnregister", ptr)

    def event(self):
        """A CUDA event recorded on the current stream (``query()``: completed; ``synchronize()``: wait for it)."""
        ev = torch.cuda.Event()
        ev.record()
        return ev

    @staticmethod
    def _call(name: str, *args) -> str | None:
        try:
            rt = torch.cuda.cudart()
            err = getattr(rt, name)(*args)
            if int(err) == 0:
                return None
            try:
                return f"{name}: {rt.cudaGetErrorString(err)} (error {int(err)})"
            except Exception:  # noqa: BLE001 - the code is what we have
                return f"{name}: CUDA error {int(err)}"
        except Exception as e:  # noqa: BLE001 - no CUDA runtime, a CPU build: said, not raised
            return f"{name}: {type(e).__name__}: {e}"


#: the CUDA calls in use (tests assign fakes with the same three methods)
CUDA = CudaCalls()

_LOCK = threading.RLock()
_WANT: set[str] = set()  # ring tokens whose buffers are to be registered
_REGISTERED: dict[int, tuple[str, int]] = {}  # buffer data_ptr -> (ring token, the address registered)
_LENT: dict[int, _Loan] = {}  # view data_ptr -> a view lent by pin_memory, not yet copied
_PENDING: list[tuple[object, _Loan]] = []  # (event after the copy, loan): freed once the event completes
_STATS: dict[str, dict] = {}  # ring token -> counts (kept after the ring is forgotten, for the run's report)
_DISABLED: str | None = None  # why registration failed in this process (then: the copy path)
COUNTS = ("registered_buffers", "unregistered_buffers", "zero_copy_batches", "copy_path_batches",
          "fallback_batches", "inline_batches")


class _Loan:
    __slots__ = ("flag", "nbytes", "state", "token")

    def __init__(self, flag: torch.Tensor, nbytes: int, token: str):
        self.flag, self.nbytes, self.token, self.state = flag, nbytes, token, "lent"


def _stats(token: str) -> dict:
    s = _STATS.get(token)
    if s is None:
        s = _STATS[token] = {"register": token in _WANT, **dict.fromkeys(COUNTS, 0), "register_error": None}
    return s


def count(token: str, key: str, n: int = 1) -> None:
    with _LOCK:
        _stats(token)[key] += n


def want(token: str) -> None:
    """Register the buffers of ring ``token`` (main process, when its stream is made)."""
    with _LOCK:
        _WANT.add(token)
        _stats(token)["register"] = True


def extra_buffers(workers: int) -> int:
    """Ring buffers per worker to add when they are lent (on top of the copy path's ``prefetch_factor + 2``).

    A lent buffer is held past the pin thread: until the copy to the GPU that reads it has completed and the next
    transfer call has seen so. Beyond the loader's own ``prefetch_factor`` batches per worker (which the copy path
    needs too), the consumer then holds up to 4 consecutive batches: the one being trained on (its copy may still
    run), the one being transferred, Lightning's one batch fetched ahead, and one more while the GPU runs a step
    behind the host. Consecutive batches come from the workers in turn: ``ceil(4 / workers)`` more per worker (8
    workers: 1; 1 worker: 4); the copy path's 2 spare buffers stay as slack. A worker that still finds none free
    takes a one-off segment (counted: ``fallback_batches``) and never waits; buffers are made only when none is free,
    so spare ones that are never needed are never made."""
    return -(-4 // max(int(workers), 1))


def _span(buf: torch.Tensor) -> tuple[int, int]:
    """The page-aligned address range covering ``buf`` (a whole mapped segment)."""
    start = buf.data_ptr() & ~(PAGE - 1)
    end = -(-(buf.data_ptr() + buf.numel() * buf.element_size()) // PAGE) * PAGE
    return start, end - start


def register(token: str, buf: torch.Tensor) -> bool:
    """Page-lock a ring buffer that has just arrived, once; False if its ring does not ask for it or registration
    is off (a failure is logged once and counted; those batches take the copy path)."""
    global _DISABLED
    with _LOCK:
        if token not in _WANT:
            return False
        if _DISABLED is not None:
            _stats(token)["register_error"] = _DISABLED
            return False
        if buf.data_ptr() in _REGISTERED:
            return True
        ptr, size = _span(buf)
        err = CUDA.register(ptr, size)
        if err is not None:
            _DISABLED = err
            _stats(token)["register_error"] = err
            log.warning("data.register_buffers: could not page-lock a loader buffer (%d bytes at %#x): %s; batch "
                        "features are copied into pinned memory instead for the rest of this run", size, ptr, err)
            return False
        _REGISTERED[buf.data_ptr()] = (token, ptr)
        _stats(token)["registered_buffers"] += 1
        return True


def is_registered(buf_ptr: int) -> bool:
    return buf_ptr in _REGISTERED


def unregister(buf: torch.Tensor) -> None:
    """Unregister a buffer about to be dropped (retired by its worker, or its ring forgotten). Only called when no
    copy may read it: a retired buffer was free (released), a forgotten ring's copies were waited for."""
    with _LOCK:
        entry = _REGISTERED.pop(buf.data_ptr(), None)
        if entry is None:
            return
        token, ptr = entry
        err = CUDA.unregister(ptr)
        _stats(token)["unregistered_buffers"] += 1
    if err is not None:
        log.warning("data.register_buffers: %s (a loader buffer at %#x)", err, ptr)


def lend(view: torch.Tensor, flag: torch.Tensor, token: str) -> torch.Tensor:
    """Hand out ``view`` (inside a registered buffer) as the batch's pinned features; its buffer stays in use until
    the copy that reads it has completed (:func:`moved`), or until ``view`` is collected untransferred."""
    loan = _Loan(flag, view.numel() * view.element_size(), token)
    key = view.data_ptr()
    with _LOCK:
        _LENT[key] = loan
        _stats(token)["zero_copy_batches"] += 1
    weakref.finalize(view, _dropped, key, loan)
    return view


def _dropped(key: int, loan: _Loan) -> None:
    with _LOCK:
        if loan.state != "lent":  # copied: the event queue frees it
            return
        loan.state = "dropped"
        if _LENT.get(key) is loan:
            del _LENT[key]
    free(loan.flag)  # never copied: nothing reads it


def moved(src: torch.Tensor) -> None:
    """After a non-blocking copy that reads ``src`` was issued: if ``src`` is a lent view, queue its buffer's release
    behind a CUDA event recorded on the current stream."""
    if not _LENT:
        return
    with _LOCK:
        loan = _LENT.get(src.data_ptr())
        if loan is None or loan.state != "lent" or src.numel() * src.element_size() != loan.nbytes:
            return
        del _LENT[src.data_ptr()]
        loan.state = "copying"
        _PENDING.append((CUDA.event(), loan))


def release_completed() -> int:
    """Free the buffers whose copies have completed (called at each transfer); returns how many."""
    if not _PENDING:
        return 0
    done = []
    with _LOCK:
        keep = []
        for ev, loan in _PENDING:
            if ev.query():
                done.append(loan)
            else:
                keep.append((ev, loan))
        _PENDING[:] = keep
    for loan in done:
        loan.state = "released"
        free(loan.flag)
    return len(done)


def release(tokens=None) -> int:
    """Wait for the queued copies (of ``tokens``' rings; None: all) and free their buffers (loader teardown)."""
    with _LOCK:
        ours = [p for p in _PENDING if tokens is None or p[1].token in tokens]
        _PENDING[:] = [p for p in _PENDING if not (tokens is None or p[1].token in tokens)]
    for ev, loan in ours:
        try:
            ev.synchronize()
        except Exception as e:  # noqa: BLE001 - at interpreter exit CUDA may be gone; the copy is then too
            log.debug("data.register_buffers: waiting for a copy at teardown: %s", e)
        loan.state = "released"
        free(loan.flag)
    return len(ours)


def forget(token: str, buffers) -> None:
    """A ring's loader is gone: wait for its copies, free them, and unregister its ``buffers`` before they are
    unmapped."""
    release({token})
    for buf in buffers:
        unregister(buf)
    with _LOCK:
        _WANT.discard(token)


def stats(tokens) -> dict | None:
    """The counts of ``tokens``' rings, summed (None: none of them was used)."""
    with _LOCK:
        got = [_STATS[t] for t in tokens if t in _STATS]
        if not got:
            return None
        out = {"register": any(s["register"] for s in got)}
        out.update({k: sum(s[k] for s in got) for k in COUNTS})
        out["register_error"] = next((s["register_error"] for s in got if s["register_error"]), None)
        return out


class CopyStreams:
    """The side streams that batches are copied to CUDA devices on (``data.copy_stream``; :func:`to_device`): one per
    device, made on first use. :meth:`for_device` gives None -- the current stream -- off CUDA or while ``enabled`` is
    false."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._streams: dict[int, object] = {}

    def for_device(self, device: torch.device):
        if not self.enabled or device.type != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream


def to_device(batch, device: torch.device, stream=None):
    """``batch`` (dicts, tuples and lists of tensors) moved to ``device`` by a direct walk (Lightning's generic one
    costs ~0.4 ms of host time per batch); pinned tensors copy asynchronously. A packed batch
    (:mod:`value_pl.data.packing`) is one copy of its block, its tensors cut out of the copy on ``device``. Lent
    loader buffers are handed back to their workers once the copies reading them are done: those of earlier calls,
    as their events complete.

    ``stream``: a CUDA side stream to issue the copies on (``data.copy_stream``). On the current stream a copy waits
    for the work queued before it -- the previous training step's backward and optimizer -- and the GPU runs no
    kernel meanwhile; on a side stream it overlaps with that work. The current stream then waits for the copies
    (``wait_stream``), and every tensor they made is marked as used on it (``record_stream``), so that the caching
    allocator does not hand its memory to the side stream again before the current stream is done with it."""
    release_completed()
    if stream is None:
        return _to_device(batch, device)
    made: list[torch.Tensor] = []
    with torch.cuda.stream(stream):
        out = _to_device(batch, device, made)
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    for t in made:
        t.record_stream(current)
    return out


def _to_device(x, device, made: list | None = None):
    if type(x) is dict and packing.RING_KEY in x:  # a packed batch: one copy, its tensors cut out on the device
        block = x[packing.RING_KEY]
        if not isinstance(block, packing.Packed):
            block = block.materialize()  # not pinned (no pin thread): copied out of its worker's buffer here
        x = packing.resolve(x, packing.views(_to_device(block.block, device, made), block.layout))
    if isinstance(x, torch.Tensor):
        if x.device == device:
            return x
        y = x.to(device, non_blocking=device.type == "cuda")
        moved(x)  # a lent loader buffer: released once this copy has completed
        if made is not None:
            made.append(y)
        return y
    if type(x) is dict:
        return {k: _to_device(v, device, made) for k, v in x.items()}
    if type(x) in (tuple, list) and x and any(isinstance(v, (torch.Tensor, dict, tuple, list)) for v in x):
        return type(x)(_to_device(v, device, made) for v in x)
    return x
