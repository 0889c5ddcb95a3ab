"""How a collated batch crosses from a loader worker to the main process, cheaply.

By default torch hands every tensor of a worker's batch over as its own shared-memory segment: the worker
copies the tensor into a fresh segment, and the main process, while unpickling, fetches the segment's file
descriptor from the worker (a socket connection with an authentication round trip, answered by a thread of
the *busy* worker, which must first get that worker's GIL), maps the segment, faults its pages in as it reads
them, and unmaps it again. A collated pair batch holds ~18 tensors, so the main process -- which also drives
the GPU -- paid ~18 such round trips and a fresh mapping of ~38 MB of features per batch of 256 images.
Here:

* **Small tensors travel by value.** Tensors of up to :data:`INLINE_BYTES` (token ids, masks, boxes, pair
  indices) are pickled into the message itself and come out as ordinary tensors (``torch.from_numpy``).
* **Features go through reused buffers.** The region features -- the one large tensor -- are written by the
  collator straight into shared memory (:func:`batch_tensor`). When training batches are pinned for a GPU
  (``ShardStream(ring_buffers=...)``, set by the DataModule), each worker keeps a small ring of shared buffers: a
  buffer's segment crosses to the main process once, the main process keeps it mapped (:data:`_OPEN`), and later
  batches name only (ring, worker, buffer). A worker never writes a buffer that the main process may still read:
  the main process marks it free in its header once it has copied it out; when none is free (the main process is
  behind) the worker allocates a new one, up to ``prefetch_factor + 2`` per worker, then falls back to a one-off
  segment (counted in the main process: :func:`value_pl.data.pinning.stats`).
* **Such a batch travels whole in its buffer.** The worker also writes the batch's other tensors into the buffer,
  after the features (:meth:`Ring.pack`, :mod:`value_pl.data.packing`), and the message carries only their layout,
  the sample keys and the counts. The pin thread copies the buffer's used part into pinned memory with one call
  (:meth:`RingBatch.pin_memory`; split across ``data.pin_threads`` threads: :mod:`value_pl.data.pincopy`) and
  frees the buffer; the transfer copies that block to the GPU with one copy and cuts the tensors out of it there.
  Each torch call gives up the GIL, which the pin thread then waits to take back while the main thread runs Python,
  so one call per batch instead of ~18 (and one pipe read of a few KB instead of ~0.7 MB) is what keeps the pin
  thread fed. Tensors that do not fit the buffer's spare room cross by value (counted: ``inline_batches``).
* With ``data.register_buffers=true`` (the default) the main process page-locks each buffer with CUDA once, and
  pinning lends the buffer's view instead of copying it; the buffer is freed once the copy to the GPU has completed
  (:mod:`value_pl.data.pinning`).
* Without pinning (CPU training) the features tensor is the model's input, so it gets a fresh segment per
  batch as before; so do evaluation batches (a ring per eval loader would stay resident in ``/dev/shm`` all run).

The main process receives a ``dict``: exactly what the collator built, or, for a batch packed into its ring
buffer, the same dict with :class:`~value_pl.data.packing.Slot` s in place of its tensors until the transfer (or
:func:`value_pl.data.packing.unpack`) puts them back (``tests/test_handover.py``); the main-process cost per batch
is a row of ``benchmarks/run.py``.
"""
from __future__ import annotations

import os
import threading
import uuid
import weakref

import numpy as np
import torch

from . import packing, pincopy, pinning
from .pinning import fence as _fence

#: tensors up to this size are pickled by value (one copy into the message) instead of one segment each
INLINE_BYTES = 1 << 20
_ROOM = 64 << 10  # spare bytes in a new buffer for a batch's other tensors, at least
_HEADER = 64  # bytes before a ring buffer's payload; int64 at 0: 1 while the main process may read it
_NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                 torch.float32, torch.float64}

# main process: ring token -> {(worker pid, buffer index): uint8 tensor over the whole buffer}
_OPEN: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
_OPEN_LOCK = threading.Lock()
# a loader worker: the ring it writes into (one per dataset, set by ShardStream in the worker)
_ACTIVE: Ring | None = None


def buffer_bytes(nbytes: int, reserve: int = 0) -> int:
    """The size of a new ring buffer for features of ``nbytes``: its header, the features with a quarter more
    (headroom for batches with more regions) and room for the batch's other tensors (``reserve``: the most they took
    so far). What ``/dev/shm`` holds per buffer (:meth:`value_pl.data.datamodule.ShardDataModule.check_shared_memory`)."""
    return _HEADER + packing.align(nbytes + nbytes // 4) + max(2 * int(reserve), _ROOM)


class Ring:
    """A loader worker's reusable shared buffers for batch features (see the module docstring)."""

    def __init__(self, token: str, max_buffers: int, pack: bool = True):
        self.token, self.max_buffers, self.pack_others = token, int(max_buffers), bool(pack)
        self.pid = os.getpid()
        self.buffers: list[torch.Tensor] = []  # uint8, header + payload
        self.sent: set[int] = set()  # buffers whose segment the main process has been sent
        self.retired: list[int] = []  # indices the main process should forget (next message says so)
        self.by_ptr: dict[int, int] = {}  # payload data_ptr -> index
        self.fallbacks = 0  # batches that got a one-off segment (no free buffer)
        self.fallback_ptrs: set[int] = set()  # their data_ptrs, until they are sent (counted by the main process)
        self.reserve = 0  # room a batch's other tensors took after its features (the most seen): kept free
        # tensor() runs in the worker's main thread, ref() in its queue's feeder thread (pickling)
        self.lock = threading.Lock()

    def _flag(self, i: int) -> torch.Tensor:
        return self.buffers[i][:8].view(torch.int64)

    def tensor(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` in a free buffer (now marked in use), or a one-off shared tensor."""
        with self.lock:
            return self._tensor(shape, dtype)

    def _tensor(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        need = packing.align(nbytes) + self.reserve  # the batch's other tensors go after the features
        free = [i for i, b in enumerate(self.buffers) if b is not None and int(self._flag(i)[0]) == 0]
        i = next((i for i in free if self.buffers[i].numel() - _HEADER >= need), None)
        if i is None and free and len([b for b in self.buffers if b is not None]) >= self.max_buffers:
            i = free[0]  # too small: retire it for a bigger one
            self.by_ptr.pop(self.buffers[i].data_ptr() + _HEADER, None)
            self.buffers[i] = None
            self.retired.append(i)
            self.sent.discard(i)
        if i is None or self.buffers[i] is None:
            if len([b for b in self.buffers if b is not None]) >= self.max_buffers:
                self.fallbacks += 1
                t = _shared(shape, dtype)
                self.fallback_ptrs.add(t.data_ptr())
                return t
            # headroom for batches with more regions, and room for the other tensors
            size = buffer_bytes(nbytes, self.reserve)
            buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size), 0, (size,))
            if i is None:
                i = len(self.buffers)
                self.buffers.append(buf)
            else:
                self.buffers[i] = buf
            self.by_ptr[buf.data_ptr() + _HEADER] = i
        _fence()
        self._flag(i)[0] = 1
        _fence()
        return self.buffers[i][_HEADER:_HEADER + nbytes].view(dtype).view(shape)

    def ref(self, t: torch.Tensor, layout=None, inline: bool = False) -> _RingRef | None:
        """What crosses for ``t`` (at pickling, in the queue's feeder thread): its ring buffer's reference, with
        the ``layout`` of what :meth:`pack` wrote into it (None: ``t`` alone); None if ``t`` is in no buffer."""
        with self.lock:
            i = self.by_ptr.get(t.data_ptr())
            if i is None or not t.is_contiguous():
                return None
            first = i not in self.sent
            self.sent.add(i)
            retired, self.retired = self.retired, []
        return _RingRef(self.token, self.pid, i, self.buffers[i] if first else None,
                        layout or [packing.entry(0, t)], inline, retired)

    def fallback(self, t: torch.Tensor) -> _Fallback | None:
        """``t`` as a counted one-off segment, if it is one of this ring's fallbacks (none was free)."""
        with self.lock:
            if t.data_ptr() not in self.fallback_ptrs:
                return None
            self.fallback_ptrs.discard(t.data_ptr())
        return _Fallback(self.token, t)

    def pack(self, batch: dict) -> dict:
        """In the worker, before ``batch`` is queued: if a tensor of it lives in one of this ring's buffers (its
        features), write the batch's other tensors into the same buffer after it, and return the batch with
        :class:`~value_pl.data.packing.Slot` s in their place and the buffer under
        :data:`~value_pl.data.packing.RING_KEY`. Tensors that do not fit the buffer's spare room stay in the batch
        (they cross by value), as do all of them when the ring does not pack (``data.pack_batches=false``). Any other
        batch is returned as it is."""
        found: list[torch.Tensor] = []
        with self.lock:
            _walk(batch, lambda t: found.append(t) if t.data_ptr() in self.by_ptr else None)
            if len({t.data_ptr() for t in found}) > 1:
                raise RuntimeError(f"a batch holds tensors in {len(found)} loader ring buffers; one (its features) "
                                   "is allowed")
            base = max(found, key=lambda t: t.nbytes, default=None)  # (any other: a view of it, copied as the rest)
            if base is None or not base.is_contiguous():
                return batch
            buf = self.buffers[self.by_ptr[base.data_ptr()]]
        others = []
        if self.pack_others:
            _walk(batch, lambda t: others.append(t) if (t is not base and _packable(t)) else None)
        layout, off = [packing.entry(0, base)], packing.align(base.nbytes)
        for t in others:
            layout.append(packing.entry(off, t))
            off = packing.align(off + t.nbytes)
        self.reserve = max(self.reserve, off - packing.align(base.nbytes))
        fits = _HEADER + off <= buf.numel()
        if fits and others:
            room = buf[_HEADER:_HEADER + off].numpy()
            for (o, _, shape), t in zip(layout[1:], others):
                src = t.numpy()
                room[o:o + src.nbytes].view(src.dtype).reshape(src.shape)[...] = src
        slots = {id(base): packing.Slot(0)}
        if fits:
            slots.update((id(t), packing.Slot(j)) for j, t in enumerate(others, 1))
        out = _slotted(batch, slots)
        out[packing.RING_KEY] = _Block(self, base, layout if fits else layout[:1], inline=bool(others) and not fits)
        return out


def _walk(batch: dict, fn) -> None:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            fn(v)
        elif type(v) is dict:
            _walk(v, fn)


def _packable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not t.requires_grad


def _slotted(batch: dict, slots: dict) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and id(v) in slots:
            v = slots[id(v)]
        elif type(v) is dict:
            v = _slotted(v, slots)
        out[k] = v
    return out


class _Block:
    """A packed batch's ring buffer, leaving a worker: crosses as its ring reference (:meth:`Ring.ref`)."""

    __slots__ = ("base", "inline", "layout", "ring")

    def __init__(self, ring: Ring, base: torch.Tensor, layout, inline: bool):
        self.ring, self.base, self.layout, self.inline = ring, base, layout, inline

    def __reduce__(self):
        ref = self.ring.ref(self.base, self.layout, self.inline)
        if ref is None:
            raise RuntimeError("a packed batch's ring buffer is no longer known to its ring")
        return ref.__reduce__()


def _shared(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(n), 0, shape)


def batch_tensor(shape: tuple, dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch's features: in a loader worker it lives in shared memory (a ring
    buffer when the ring is on), so handing the batch over copies nothing; elsewhere an ordinary tensor."""
    dt = dtype if isinstance(dtype, torch.dtype) else torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
    if torch.utils.data.get_worker_info() is None or not int(np.prod(shape)):
        return torch.empty(shape, dtype=dt)
    if _ACTIVE is not None:
        return _ACTIVE.tensor(tuple(shape), dt)
    return _shared(tuple(shape), dt)


def activate(token: str | None, max_buffers: int, pack: bool = True) -> Ring | None:
    """In a loader worker: use the ring of ``token`` (None: no ring) for the batches made from now on; ``pack``:
    write each batch's other tensors into its buffer too (``data.pack_batches``)."""
    global _ACTIVE
    if token is None:
        _ACTIVE = None
    elif _ACTIVE is None or _ACTIVE.token != token or _ACTIVE.pid != os.getpid():
        _ACTIVE = Ring(token, max_buffers, pack)
    return _ACTIVE


def forget(token: str) -> None:
    """Main process: drop the buffers of a ring (its loader is gone), unmapping them (page-locked ones are
    unregistered first, once the copies reading them are done: :func:`value_pl.data.pinning.forget`)."""
    with _OPEN_LOCK:
        bufs = _OPEN.pop(token, None)
    pincopy.forget(token)
    pinning.forget(token, list((bufs or {}).values()))


def new_token(owner, register: bool = False, copy_threads: int = 1) -> str:
    """A ring token for ``owner`` (a dataset in the main process); its buffers are forgotten with it.
    ``register``: page-lock its buffers with CUDA and lend them to the transfer (``data.register_buffers``);
    ``copy_threads``: else copy them into pinned memory with this many threads (``data.pin_threads``)."""
    token = uuid.uuid4().hex
    pincopy.want(token, copy_threads)
    if register:
        pinning.want(token)
    weakref.finalize(owner, forget, token)
    return token


class RingBatch:
    """Main process: a training batch in a worker's ring buffer (its features first, then, packed, its other
    tensors: :mod:`value_pl.data.packing`). The DataLoader's pin thread calls :meth:`pin_memory`, which copies the
    buffer's used part out with one call and frees the buffer -- or, when the buffer is page-locked
    (``data.register_buffers``), lends the buffer's view itself, freed after the copy to the GPU
    (:mod:`value_pl.data.pinning`); nothing else may hold this object."""

    __slots__ = ("base", "flag", "layout", "token", "view")

    def __init__(self, view: torch.Tensor, flag: torch.Tensor, layout, token: str = "", base: int = 0):
        self.view, self.flag, self.layout, self.token, self.base = view, flag, layout, token, base

    def copy_out(self, copy) -> packing.Packed:
        """The block copied out by ``copy`` (a function of a uint8 tensor); the buffer is free after."""
        if self.flag is None:
            raise RuntimeError("this ring batch was already copied out (the buffer may hold another batch)")
        out = copy(self.view)
        _fence()
        self.flag[0] = 0  # the worker may write the buffer again
        self.view = self.flag = None
        return packing.Packed(out, self.layout)

    def materialize(self) -> packing.Packed:
        return self.copy_out(torch.clone)

    def pin_memory(self, device=None) -> packing.Packed:
        if self.flag is not None and pinning.is_registered(self.base):
            view, flag, self.view, self.flag = self.view, self.flag, None, None
            return packing.Packed(pinning.lend(view, flag, self.token), self.layout)
        pinning.count(self.token, "copy_path_batches")
        n = pincopy.threads(self.token)
        return self.copy_out(lambda v: pincopy.pinned(v, n))

    def __del__(self):
        if self.flag is not None:  # dropped unread (e.g. a loader shut down mid-epoch): nobody reads it now
            self.flag[0] = 0


class _RingRef:
    """What crosses for a ring batch: the buffer's segment the first time, its index afterwards, and the layout."""

    __slots__ = ("buffer", "index", "inline", "layout", "pid", "retired", "token")

    def __init__(self, token, pid, index, buffer, layout, inline, retired):
        self.token, self.pid, self.index, self.buffer = token, pid, index, buffer
        self.layout, self.inline, self.retired = layout, inline, retired

    def __reduce__(self):
        return _open_ring_batch, (self.token, self.pid, self.index, self.buffer, self.layout, self.inline,
                                  self.retired)


def _open_ring_batch(token, pid, index, buffer, layout, inline, retired) -> RingBatch:
    with _OPEN_LOCK:
        bufs = _OPEN.setdefault(token, {})
        for i in retired:  # free (so released, no copy reads it): unregistered before it is unmapped
            old = bufs.pop((pid, i), None)
            if old is not None:
                pinning.unregister(old)
        if buffer is not None:
            bufs[(pid, index)] = buffer
            pinning.register(token, buffer)  # once per buffer, if its ring asks for it
        buf = bufs.get((pid, index))
    if buf is None:
        raise RuntimeError(f"a batch names ring buffer {index} of loader worker {pid}, which this process "
                           "was never sent (or has forgotten): a message from that worker was lost")
    if inline:
        pinning.count(token, "inline_batches")
    n = packing.nbytes(layout)
    if _HEADER + n > buf.numel():
        raise RuntimeError(f"a batch's layout ({n} bytes) overruns ring buffer {index} of loader worker {pid} "
                           f"({buf.numel() - _HEADER} bytes)")
    return RingBatch(buf[_HEADER:_HEADER + n], buf[:8].view(torch.int64), layout, token, buf.data_ptr())


class _Fallback:
    """A batch's features in a one-off segment (its worker had no free buffer): crosses as the tensor, counted."""

    __slots__ = ("tensor", "token")

    def __init__(self, token: str, tensor: torch.Tensor):
        self.token, self.tensor = token, tensor

    def __reduce__(self):
        return _fallback_features, (self.token, self.tensor)


def _fallback_features(token: str, tensor: torch.Tensor) -> torch.Tensor:
    pinning.count(token, "fallback_batches")
    return tensor


class _Inline:
    """A small tensor that unpickles as a tensor built from its bytes."""

    __slots__ = ("array",)

    def __init__(self, tensor: torch.Tensor):
        self.array = tensor.numpy()

    def __reduce__(self):
        return torch.from_numpy, (self.array,)


def _pack(value):
    if isinstance(value, torch.Tensor):
        if _ACTIVE is not None and value.is_shared():
            ref = _ACTIVE.fallback(value)
            if ref is not None:
                return ref
        if (value.device.type == "cpu" and value.dtype in _NUMPY_DTYPES and not value.requires_grad
                and value.nbytes <= INLINE_BYTES and not value.is_shared()):
            return _Inline(value)
        return value
    if type(value) is dict:
        return {k: _pack(v) for k, v in value.items()}
    return value


class Handover(dict):
    """A batch leaving a loader worker (made by :func:`leave`): pickles its small tensors by value and a packed
    batch's buffer as a ring reference, and unpickles as a plain ``dict``."""

    def __reduce__(self):
        return dict, ([(k, _pack(v)) for k, v in self.items()],)


def leave(batch, ring: Ring | None = None):
    """In a loader worker: ``batch`` (a collated dict) as it is to be queued for the main process -- packed into
    its ring buffer when its features are in one of ``ring`` (None: the worker's active ring; :meth:`Ring.pack`)."""
    if type(batch) is not dict:
        return batch
    ring = ring if ring is not None else _ACTIVE
    return Handover(ring.pack(batch) if ring is not None else batch)
