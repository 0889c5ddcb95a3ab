"""LightningDataModule over WebDataset shard sets (see :mod:`value_pl.data.schema`).

Training pipeline per rank (open_clip style): shard list -> ``detshuffle`` seeded by (seed, epoch), the
same order on every rank -> ``split_by_node`` -> ``split_by_worker`` -> decode -> sample shuffle ->
batching with the backbone's collator inside the pipeline -> repeat -> ``with_epoch(n)`` so that every
rank yields exactly the same number of batches per epoch (unequal batch counts hang DDP).

Validation/test read every shard exactly once (no repeat, no padding); shards are split by node, so
under DDP each sample is seen by exactly one rank, and metrics are synchronised by torchmetrics.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
import webdataset as wds

from .schema import decode_sample, load_manifest

log = logging.getLogger(__name__)


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(pl.LightningDataModule):
    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 0, shuffle_buffer: int = 256,
                 seed: int = 0, splits: dict | None = None, train_batches: int | None = None,
                 eval_batch_size: int | None = None, transform=None, auto_workers: bool = False,
                 decode=None):
        super().__init__()
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.splits = dict(splits or {"train": "train", "val": "val", "test": "test"})
        self.train_batches = train_batches
        self.collate = None  # set by the caller: the backbone's collator for the task
        self.transform = transform  # optional per-sample map (after decode), e.g. the mismatch variant
        self.auto_workers = bool(auto_workers)  # true: fewer loader workers instead of an error
        self.decode = decode or decode_sample  # the feature cache (value_pl.data.cache) decodes its own records

    # ---------------------------------------------------------------- helpers
    def urls(self, stage: str) -> list[str]:
        split = self.splits[stage]
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.root}/manifest.json has no split {split!r} (has {list(self.manifest['splits'])})")
        shards = self.manifest["splits"][split]["shards"]
        urls = [str(self.root / s) for s in shards]
        missing = [u for u in urls if not Path(u).exists()]
        if missing:
            raise FileNotFoundError(f"{self.root}: manifest lists missing shard(s) {missing[:3]}")
        return urls

    def num_samples(self, stage: str) -> int:
        return int(self.manifest["splits"][self.splits[stage]]["samples"])

    def _workers(self, n_shards: int, world: int, stage: str) -> int:
        """Loader workers per rank. Every rank needs a shard, and (training) every worker too.

        A training worker without a shard would loop in ``repeat`` forever and its rank would hang, so
        ``shards < world x workers`` is an error for training unless ``data.auto_workers=true`` (then
        fewer workers). Validation/test read their shards once: idle workers are harmless, so the number
        of workers is lowered silently there.
        """
        split = self.splits[stage]
        if n_shards < world:
            raise ValueError(f"{self.root}: split {split!r} has {n_shards} shard(s) for {world} "
                             f"ranks; every rank needs at least one shard (rebuild with a smaller maxcount)")
        per_rank = n_shards // world
        w = min(self.num_workers, per_rank) if self.num_workers > 0 else 0
        if self.num_workers > w:
            if stage == "train" and not self.auto_workers:
                raise ValueError(
                    f"{self.root}: split {split!r} has {n_shards} shard(s) for {world} rank(s) x "
                    f"{self.num_workers} loader worker(s) = {world * self.num_workers}; every worker needs a "
                    f"shard. Rebuild the shards with a smaller maxcount, set data.num_workers<={per_rank}, "
                    f"or data.auto_workers=true to use {w} worker(s)")
            (log.warning if stage == "train" else log.info)(
                "%s: %d shard(s) per rank for split %s: using %d loader worker(s) instead of %d",
                self.root, per_rank, split, w, self.num_workers)
        return w

    def _pipeline(self, stage: str, train: bool):
        if self.collate is None:
            raise RuntimeError("ShardDataModule.collate is not set (the backbone's collator)")
        urls = self.urls(stage)
        rank, world = _dist()
        workers = self._workers(len(urls), world, stage)
        bs = self.batch_size if train else self.eval_batch_size
        stages = [wds.SimpleShardList(urls)]
        if train:
            stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=self.seed))
        stages += [wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples(), wds.map(self.decode)]
        if self.transform is not None:
            stages.append(wds.map(self.transform))
        if train and self.shuffle_buffer > 1:
            # seeded per rank: the same seed gives the same batches (online and cached training agree)
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 64),
                                      seed=self.seed * 1_000_003 + rank))
        stages.append(wds.batched(bs, collation_fn=self.collate, partial=not train))
        ds = wds.DataPipeline(*stages)
        if train:
            n = self.train_batches or max(1, self.num_samples(stage) // (bs * world))
            per_worker = math.ceil(n / max(workers, 1))
            ds = ds.repeat(nepochs=10**9).with_epoch(per_worker)
            self.batches_per_epoch = per_worker * max(workers, 1)
        loader = wds.WebLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False)
        return loader

    def train_dataloader(self):
        return self._pipeline("train", True)

    def val_dataloader(self):
        return self._pipeline("val", False)

    def test_dataloader(self):
        return self._pipeline("test", False)

    def label_counts(self, task: str, stage: str = "train") -> dict[str, int]:
        return self.manifest["splits"][self.splits[stage]]["pairs"].get(task, {})
