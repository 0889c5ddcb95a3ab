"""A batch's tensors in one block of bytes: how a pinned training batch travels from the pin thread to the GPU.

A loader worker writes every tensor of a training batch into the ring buffer that holds its features
(:meth:`value_pl.data.handover.Ring.pack`) and sends, in place of each tensor, a :class:`Slot` naming its entry in
the block's layout; the block itself travels under :data:`RING_KEY`. The DataLoader's pin thread then pins the
block with one call (:meth:`value_pl.data.handover.RingBatch.pin_memory`, giving a :class:`Packed`), and the
transfer copies it to the GPU with one copy and cuts the tensors out of the copy there
(:func:`value_pl.data.pinning.to_device`). After the transfer the batch is exactly the dict the collator built.

Why: every torch call releases the GIL, and a thread that gave it up waits to take it back until the thread
holding it releases it -- while the main thread runs Python (Lightning's loop, the step's hooks), up to
``sys.getswitchinterval()`` (5 ms) per call. Measured on the 2-core CPU with a pure-Python thread busy, one
``clone()`` of a small tensor took ~29 ms and one ``view(dtype)`` ~6.6 ms; slicing and ``torch.from_numpy`` took
microseconds (they keep the GIL). A pair batch has ~18 tensors, each of which the pin thread pinned by its own call,
and ~0.7 MB of them pickled by value, which the pin thread read from the pipe in 64 KB pieces (each read also gives
up the GIL). Packed, the message is a few KB and the pin thread makes one torch call per batch.

Layout entries are ``(offset in bytes, dtype name, shape)``; offsets are multiples of :data:`ALIGN`, so that each
entry is a strided view of the block reinterpreted as its dtype (:func:`views`: one call per entry, one per dtype).
"""
from __future__ import annotations

import math

import torch

#: the key under which a packed batch's block travels (removed again by :func:`unpack` and the transfer)
RING_KEY = "__ring__"
#: byte alignment of every entry (and of the block's length)
ALIGN = 64


def align(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


class Slot:
    """Stands in a batch for its block's entry ``index`` until the batch is unpacked."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = int(index)

    def __reduce__(self):
        return Slot, (self.index,)

    def __repr__(self):
        return f"Slot({self.index})"


def entry(offset: int, t: torch.Tensor) -> tuple[int, str, tuple[int, ...]]:
    return int(offset), str(t.dtype).removeprefix("torch."), tuple(int(s) for s in t.shape)


def nbytes(layout) -> int:
    """The block length ``layout`` needs (aligned)."""
    return max((align(off + math.prod(shape) * _dtype(dt).itemsize) for off, dt, shape in layout), default=0)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"a packed batch's layout names an unknown dtype {name!r}")
    return dt


def views(block: torch.Tensor, layout) -> list[torch.Tensor]:
    """The tensors of ``layout`` as views of ``block`` (a contiguous uint8 tensor on any device, its length and
    storage offset multiples of :data:`ALIGN`)."""
    if block.dtype != torch.uint8 or block.dim() != 1 or not block.is_contiguous():
        raise ValueError(f"a packed block must be a contiguous 1-d uint8 tensor, got {block.dtype} "
                         f"{tuple(block.shape)}")
    if block.numel() < nbytes(layout):
        raise ValueError(f"a packed block of {block.numel()} bytes is shorter than its layout ({nbytes(layout)} bytes)")
    typed: dict[str, tuple[torch.Tensor, int, int]] = {}  # dtype name -> (block as it, its offset, element bytes)
    out = []
    for off, dt, shape in layout:
        got = typed.get(dt)
        if got is None:
            dtype = _dtype(dt)
            base = block.view(dtype)
            got = typed[dt] = (base, base.storage_offset(), dtype.itemsize)
        base, start, size = got
        stride, n = [1] * len(shape), 1
        for i in range(len(shape) - 1, -1, -1):
            stride[i] = n
            n *= shape[i] or 1
        out.append(base.as_strided(shape, stride, start + off // size))
    return out


class Packed:
    """A batch's tensors in one block (pinned, or lent from a page-locked loader buffer), with their layout."""

    __slots__ = ("block", "layout")

    def __init__(self, block: torch.Tensor, layout):
        self.block, self.layout = block, list(layout)

    def tensors(self) -> list[torch.Tensor]:
        return views(self.block, self.layout)


def resolve(batch: dict, tensors: list[torch.Tensor]) -> dict:
    """``batch`` without :data:`RING_KEY`, every :class:`Slot` (in it and its nested dicts) replaced by its tensor."""
    out = {}
    for k, v in batch.items():
        if k == RING_KEY:
            continue
        if isinstance(v, Slot):
            v = tensors[v.index]
        elif type(v) is dict:
            v = resolve(v, tensors)
        out[k] = v
    return out


def unpack(batch):
    """A received batch as the collator built it, on the CPU: a packed batch's tensors cut out of its block (a ring
    batch not pinned yet is first copied out of its worker's buffer, which frees the buffer). Anything else is
    returned as it is."""
    if type(batch) is not dict or RING_KEY not in batch:
        return batch
    block = batch[RING_KEY]
    if not isinstance(block, Packed):
        block = block.materialize()
    return resolve(batch, block.tensors())
