"""Exact reading of WebDataset shard sets: every sample once per epoch, any number of shards, ranks and workers.

A split's samples are numbered in shard order (training: the shards in a seeded order per epoch, the same on
every rank). Each rank takes a contiguous range of that numbering and each of its loader workers a contiguous
part of the rank's range, cut at batch boundaries:

* evaluation (val/test/extraction/analyses): the ranges cover every sample exactly once (ranks differ by at
  most one sample), so DDP metrics summed over ranks equal the 1-process metrics;
* training: every rank takes ``N // world`` samples (the ``N % world < world`` left over change from epoch to
  epoch), so all ranks yield the same number of batches (unequal counts hang DDP) and an epoch sees each
  sample once, with at most one partial batch per rank.

A worker reads only the shards its range touches; a range that starts inside a shard skips the earlier
samples by seeking over their bytes (tar headers only). Fewer shards than ranks x workers is therefore fine:
several workers share a shard, each reading its own part. Samples per shard come from ``manifest.json``
(``shard_samples``, written by the builders) or, for older shard sets, from one header scan at start.

Shards are read by our own tar reader (:mod:`value_pl.data.tar`): a corrupt or truncated shard is a
:class:`~value_pl.data.schema.SchemaError` naming the file and byte offset. A stream reads each shard through a map
of the file (``data.map_shards``): its samples' files are views of the map, copied only by the collator.
"""
from __future__ import annotations

import gc
import itertools
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from . import handover
from .schema import SchemaError
from .tar import iter_samples

# ------------------------------------------------------------------------------------------ plans
def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard order of one epoch: seeded by (seed, epoch) when shuffling, the same on every rank."""
    if not shuffle:
        return list(range(n_shards))
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED]).permutation(n_shards).tolist()


@dataclass(frozen=True)
class SlotRange:
    """The part of an epoch's sample numbering one (rank, worker) reads, and the batches it makes."""

    start: int
    stop: int
    batches: int


def rank_range(total: int, rank: int, world: int, train: bool, cap: int | None = None) -> tuple[int, int]:
    """[start, stop) of the rank. Training: N // world each (equal batch counts); eval: all samples."""
    if train:
        per = total // world
        n = per if cap is None else min(per, cap)
        return rank * per, rank * per + n
    return total * rank // world, total * (rank + 1) // world


def slot_range(total: int, rank: int, world: int, worker: int, workers: int, batch_size: int, train: bool,
               cap: int | None = None) -> SlotRange:
    """The worker's contiguous part of its rank's range, cut at batch boundaries (one partial batch per rank)."""
    a, b = rank_range(total, rank, world, train, cap)
    nb = math.ceil((b - a) / batch_size)
    b0, b1 = nb * worker // workers, nb * (worker + 1) // workers
    s = a + b0 * batch_size
    e = min(a + b1 * batch_size, b)
    return SlotRange(s, max(s, e), b1 - b0)


def batches_per_rank(total: int, rank: int, world: int, batch_size: int, train: bool, cap: int | None = None) -> int:
    a, b = rank_range(total, rank, world, train, cap)
    return math.ceil((b - a) / batch_size)


def rotated(start: int, stop: int, total: int, offset: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of a numbering of ``total`` samples shifted by ``offset`` (mod ``total``): one or two ranges."""
    a, b = start + offset, stop + offset
    if b <= total:
        return [(a, b)] if a < b else []
    if a >= total:
        return [(a - total, b - total)]
    return [(a, total), (0, b - total)]


def train_offset(total: int, world: int, seed: int, epoch: int, cap: int | None = None) -> int:
    """Where an epoch's training numbering starts. The ranks read ``world`` equal parts of it, and what is left
    (``total % world`` samples, or more under ``data.train_batches``) is its end: without an offset that would be
    the same samples every epoch whenever the shard order cannot change it (one shard, or a last shard that stays
    last). A (seed, epoch)-seeded offset, the same on every rank, moves the leftover through all samples."""
    per = total // max(world, 1)
    used = world * (per if cap is None else min(per, cap))
    if total <= 0 or used >= total:
        return 0
    return int(np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x0FF5E7]).integers(total))


def pieces(order: list[int], counts: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Global range [start, stop) of the numbering in ``order`` -> [(shard, local start, local stop)]."""
    out, pos = [], 0
    for s in order:
        n = counts[s]
        a, b = max(start, pos), min(stop, pos + n)
        if a < b:
            out.append((s, a - pos, b - pos))
        pos += n
        if pos >= stop:
            break
    return out


# ----------------------------------------------------------------------------------------- stream
def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_init(_worker_id: int) -> None:
    """One intra-op thread per loader worker (collation is numpy/torch on small arrays), and a garbage collector
    that leaves the inherited objects (torch, transformers, the tokenizer) alone: the sample metadata is acyclic,
    but its many small objects made full collections over the whole process cost more than decoding."""
    torch.set_num_threads(1)
    gc.freeze()
    gc.set_threshold(20_000, 50, 1000)


def _same(batch):
    return batch


def no_collate(batch):
    return batch  # batches are made (and collated) inside the stream


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one split for one rank: read, decode, (train: shuffle), batch and collate in the workers.

    ``len()`` is the number of batches the rank yields per epoch (the same on every rank when training).
    Each ``iter()`` is one epoch: with persistent workers every worker counts its own epochs from
    ``start_epoch``, so the shard order follows (seed, epoch) without messages from the main process.
    """

    def __init__(self, urls: list[str], counts: list[int], decode: Callable, collate: Callable, batch_size: int,
                 train: bool, seed: int = 0, shuffle_buffer: int = 0, rank: int | None = None,
                 world: int | None = None, start_epoch: int = 0, transform: Callable | None = None,
                 cap_batches: int | None = None, ring_buffers: int = 0, register_buffers: bool = False,
                 pin_threads: int = 1, pack_batches: bool = True, read_ahead: bool = False, mapped: bool = True,
                 limit: int | None = None):
        super().__init__()
        if len(urls) != len(counts):
            raise ValueError(f"{len(urls)} shard(s) but {len(counts)} sample count(s)")
        r, w = _dist()
        self.urls, self.counts = list(urls), [int(c) for c in counts]
        self.total = sum(self.counts)
        self.decode, self.collate, self.transform = decode, collate, transform
        self.batch_size, self.train = int(batch_size), bool(train)
        self.seed, self.shuffle_buffer = int(seed), int(shuffle_buffer)
        self.rank, self.world = (r if rank is None else int(rank)), (w if world is None else int(world))
        self.epoch = int(start_epoch)
        self.cap = None if cap_batches is None else int(cap_batches) * self.batch_size
        # evaluation: only the split's first ``limit`` samples (in shard order), whatever the ranks and workers
        self.limit = None if (train or limit is None) else int(limit)
        # > 0 (batches are pinned): workers hand features over through this many reused buffers each;
        # register_buffers: the main process page-locks them and lends them to the GPU copy (value_pl.data.pinning);
        # else its pin thread copies them out with pin_threads threads (value_pl.data.pincopy); pack_batches: a
        # batch's other tensors ride in the same buffer (value_pl.data.packing), else they cross by value
        self.ring_buffers, self.pack_batches = int(ring_buffers), bool(pack_batches)
        self.ring_token = handover.new_token(self, bool(register_buffers), pin_threads) \
            if self.ring_buffers > 0 else None
        # read_ahead: a worker that has made its epoch's last batch makes its next epoch's first one at once (the
        # same batch, only earlier), so that a persistent worker's next epoch starts with a batch ready
        self.read_ahead, self._ahead = bool(read_ahead), None
        # mapped: raw samples hold their files as read-only views of the mapped shard, not as bytes read from it
        # (``decode`` takes any bytes-like object; :func:`iter_members`): a sample's features are copied once, into
        # its batch, and a shuffle buffer fills without copying its samples (an epoch's first batch waits for that)
        self.mapped = bool(mapped)

    def __len__(self) -> int:
        return batches_per_rank(self.numbered, self.rank, self.world, self.batch_size, self.train, self.cap)

    @property
    def numbered(self) -> int:
        """The samples of the split's numbering that the ranks share: all, or the first ``limit`` (evaluation)."""
        return self.total if self.limit is None else min(self.total, self.limit)

    def plan(self, worker: int, workers: int, epoch: int) -> tuple[list[int], SlotRange]:
        order = shard_order(len(self.urls), self.seed, epoch, self.train)
        return order, slot_range(self.numbered, self.rank, self.world, worker, workers, self.batch_size, self.train,
                                 self.cap)

    def spans(self, rng: SlotRange, epoch: int) -> list[tuple[int, int]]:
        """The ranges of the epoch's numbering a slot reads: training ones start at :func:`train_offset`."""
        if not self.train:
            return [(rng.start, rng.stop)]
        off = train_offset(self.total, self.world, self.seed, epoch, self.cap)
        return rotated(rng.start, rng.stop, self.total, off)

    def raw(self, worker: int = 0, workers: int = 1, epoch: int = 0) -> Iterator[dict]:
        """Undecoded samples of this (rank, worker) for ``epoch``, in reading order: each file's contents as
        ``memoryview`` (``mapped``) or ``bytes``."""
        order, rng = self.plan(worker, workers, epoch)
        for shard, a, b in (p for lo, hi in self.spans(rng, epoch) for p in pieces(order, self.counts, lo, hi)):
            n = 0
            for raw in iter_samples(self.urls[shard], a, b, view=self.mapped):
                n += 1
                yield raw
            if n != b - a:
                raise SchemaError(f"{self.urls[shard]}: expected samples {a}..{b - 1} but the shard has only "
                                  f"{a + n} (manifest.json's shard_samples do not match the shard; rebuild it)")

    def _decode(self, raw: dict):
        s = self.decode(raw)
        if isinstance(s, dict):
            s["source"] = (raw["__url__"], raw["__index__"])
        return self.transform(s) if self.transform is not None else s

    def samples(self, worker: int = 0, workers: int = 1, epoch: int = 0) -> Iterator[dict]:
        """Decoded samples of this (rank, worker) for ``epoch``, in reading order (no shuffle)."""
        return map(self._decode, self.raw(worker, workers, epoch))

    def batches(self, worker: int = 0, workers: int = 1, epoch: int = 0) -> Iterator:
        """The collated batches of this (rank, worker) for ``epoch``, in order (training: shuffled)."""
        it = self.raw(worker, workers, epoch)
        if self.train and self.shuffle_buffer > 1:  # shuffle bytes, decode late: few live objects, cheap GC
            seed = [self.seed & 0xFFFFFFFF, epoch, self.rank, worker, zlib.crc32(b"buffer")]
            it = _buffer_shuffle(it, self.shuffle_buffer, np.random.default_rng(seed))
        batch = []
        for raw in it:
            batch.append(self._decode(raw))
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        self.epoch += 1  # this copy's next iter() is the next epoch (persistent workers keep their copy)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (epoch, worker, workers):  # this epoch's first batch, made already
            first, rest = ahead[1], ahead[2]
            batches = iter(()) if first is _END else itertools.chain((first,), rest)
        else:
            batches = self.batches(worker, workers, epoch)
        if info is not None:  # leaving a worker: small tensors travel by value, features maybe through the ring
            handover.activate(self.ring_token, self.ring_buffers, self.pack_batches)
        out = handover.leave if info is not None else _same
        for b in batches:
            yield out(b)
        if self.read_ahead and info is not None:
            # asked for a batch past the epoch's end: this worker would now idle until the next epoch's iter(),
            # whose first batch would then wait for a shard to open, the shuffle buffer to fill and a batch to be
            # decoded (~3 batches' work); make that batch now and keep it, with the rest of its epoch's stream
            rest = self.batches(worker, workers, epoch + 1)
            self._ahead = ((epoch + 1, worker, workers), next(rest, _END), rest)


_END = object()  # read ahead: the next epoch has no batch for this worker


def _buffer_shuffle(it, size: int, rng: np.random.Generator):
    buf = []
    for s in it:
        if len(buf) < size:
            buf.append(s)
            continue
        j = int(rng.integers(size))
        buf[j], s = s, buf[j]
        yield s
    for j in rng.permutation(len(buf)):
        yield buf[j]
