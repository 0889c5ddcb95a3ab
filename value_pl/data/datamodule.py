"""LightningDataModule over WebDataset shard sets (see :mod:`value_pl.data.schema`), exact at any scale.

Every split is read by :class:`~value_pl.data.stream.ShardStream`: each rank and each of its loader workers
takes a contiguous part of the split's samples (training: the shards in a seeded order per epoch), so

* any number of shards works with any number of ranks and workers (a shard can be shared);
* validation and test see every sample exactly once, summed over ranks (DDP metrics equal 1-process ones);
* one training epoch sees each sample once (``N % world`` samples wait for a later epoch), every rank yields
  the same number of batches, and at most one batch per rank is partial.

Loader workers collate (tokenise, encode boxes, build pair indices) in parallel, stay alive across epochs and
validation runs (``persistent_workers``), and hand over pinned batches when training on a GPU. There (by default),
when the training loader hands out an epoch's last batch, the validation run that follows is started, and its first
batch starts the next training epoch (:class:`EpochAheadLoader`): neither begins by waiting for its first batch to
be decoded. Workers of a loader whose batches are pinned for a GPU are started from a server process, not forked
from the main process (``data.worker_start``, :func:`value_pl.data.loaders.start_method`).
"""
from __future__ import annotations

import functools
import logging
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from . import handover, pincopy, pinning, resources
from .loaders import (EpochAheadLoader, WorkerLoader, main_reimport_safe, pickled_modules, refers_to_main, start_method,
                      validates_after_epoch, worker_context)
from .resources import check_cores, shm_free
from .schema import decode_sample, load_manifest
from .stream import ShardStream, no_collate, worker_init
from .tar import count_samples

log = logging.getLogger(__name__)
# our len() is exact per rank (each worker reads its own part): Lightning's generic caution does not apply
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined.*")


class ShardDataModule(pl.LightningDataModule):
    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 0, shuffle_buffer: int = 256,
                 seed: int = 0, splits: dict | None = None, train_batches: int | None = None,
                 eval_batch_size: int | None = None, transform=None, decode=None, pin_memory: bool | None = None,
                 prefetch_factor: int = 4, reuse_buffers: bool = True, epoch_ahead: bool | None = None,
                 read_ahead: bool | None = None, register_buffers: bool = True, pin_threads: int | None = None,
                 pack_batches: bool = True, worker_start: str | None = None, map_shards: bool = True):
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
        # the feature cache (value_pl.data.cache) decodes its own records; shards: features checked against feature_dim
        self.decode = decode or functools.partial(decode_sample, feature_dim=self.manifest.get("feature_dim"))
        self.pin_memory = pin_memory  # None: when a CUDA device is used
        self.prefetch_factor = int(prefetch_factor)
        self.reuse_buffers = bool(reuse_buffers)
        self.register_buffers = bool(register_buffers)  # page-lock the reused buffers (value_pl.data.pinning)
        self.pack_batches = bool(pack_batches)  # a batch's other tensors ride in its reused buffer (data.packing)
        self.worker_start = start_method(worker_start, False) if worker_start is not None else None  # (checked)
        self._start_methods: dict[str, str] = {}  # stage -> how its loader's workers were started
        self._said_fork = False  # warned that a collator that cannot be pickled keeps fork
        # threads that copy a pinned training batch's features (value_pl.data.pincopy); None: from the cores
        self.pin_threads = pincopy.check_threads(pin_threads)
        self._ring_tokens: list[str] = []  # the training loaders' rings: their counts are the run's (buffer_stats)
        self._worker_starts: dict[str, list[float]] = {}  # stage -> seconds each start of its workers took
        self._copy_threads = 1  # the training loader's pin_threads, as resolved (buffer_stats)
        self.epoch_ahead = epoch_ahead  # None: when the model runs on an accelerator (:meth:`_ahead`)
        self.read_ahead = read_ahead  # training workers make their next epoch's first batch early; None: as _ahead()
        self.map_shards = bool(map_shards)  # read shards through a map of each file (ShardStream.mapped)
        self._counts: dict[str, list[int]] = {}
        self._train_shm = 0  # bytes the training loader may hold in /dev/shm (check_shared_memory)
        self._deferred_train = None  # the training loader whose next epoch the validation run's first batch starts
        self._loaders: dict[tuple, torch.utils.data.DataLoader] = {}

    # ---------------------------------------------------------------- helpers
    def split_entry(self, stage: str) -> dict:
        split = self.splits.get(stage, stage)
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.root}/manifest.json has no split {split!r} (has {list(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    def urls(self, stage: str) -> list[str]:
        urls = [str(self.root / s) for s in self.split_entry(stage)["shards"]]
        missing = [u for u in urls if not Path(u).exists()]
        if missing:
            raise FileNotFoundError(f"{self.root}: manifest lists missing shard(s) {missing[:3]}")
        return urls

    def counts(self, stage: str) -> list[int]:
        """Samples per shard: ``shard_samples`` of the manifest, else counted once from the tar headers."""
        if stage not in self._counts:
            e = self.split_entry(stage)
            urls = self.urls(stage)
            c = e.get("shard_samples")
            if c is None or len(c) != len(urls):
                c = [count_samples(u) for u in urls]
                if sum(c) != int(e.get("samples", sum(c))):
                    raise ValueError(f"{self.root}: split {self.splits.get(stage, stage)!r} has {sum(c)} samples in "
                                     f"its shards but manifest.json says {e['samples']}")
            self._counts[stage] = [int(x) for x in c]
        return self._counts[stage]

    def num_samples(self, stage: str) -> int:
        return int(self.split_entry(stage)["samples"])

    def stream(self, stage: str, train: bool, collate=None, batch_size: int | None = None,
               start_epoch: int = 0, ring_buffers: int = 0, register_buffers: bool = False,
               pin_threads: int = 1, pack_batches: bool = True, read_ahead: bool = False,
               limit: int | None = None) -> ShardStream:
        collate = collate or self.collate
        if collate is None:
            raise RuntimeError("ShardDataModule.collate is not set (the backbone's collator)")
        return ShardStream(self.urls(stage), self.counts(stage), self.decode, collate,
                           batch_size or (self.batch_size if train else self.eval_batch_size), train=train,
                           seed=self.seed, shuffle_buffer=self.shuffle_buffer if train else 0,
                           start_epoch=start_epoch, transform=self.transform,
                           cap_batches=self.train_batches if train else None, ring_buffers=ring_buffers,
                           register_buffers=register_buffers, pin_threads=pin_threads, pack_batches=pack_batches,
                           read_ahead=read_ahead, mapped=self.map_shards, limit=limit)

    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return getattr(trainer.strategy.root_device, "type", "cpu") == "cuda"
        return torch.cuda.is_available()

    def loader(self, stage: str, train: bool, collate=None, batch_size: int | None = None,
               num_workers: int | None = None, limit: int | None = None) -> torch.utils.data.DataLoader:
        """A DataLoader over :meth:`stream` (batches are made inside the workers); ``limit`` (evaluation): the split's
        first ``limit`` samples only, the same ones with any number of ranks and workers."""
        trainer = getattr(self, "trainer", None)
        start = int(trainer.current_epoch) if (train and trainer is not None) else 0
        workers = self.num_workers if num_workers is None else int(num_workers)
        pin = self._pin() and torch.cuda.is_available()
        # pinned training batches: the pin thread copies features out of reused worker buffers (value_pl.data.handover);
        # eval loaders keep one-off segments, so their buffers do not stay resident in /dev/shm while training runs
        ring = self.prefetch_factor + 2 if (pin and train and workers > 0 and self.reuse_buffers) else 0
        register = bool(ring) and self.register_buffers  # then held until copied to the GPU: more per worker
        ring += pinning.extra_buffers(workers) if register else 0
        ranks = getattr(trainer, "num_devices", 1) if trainer is not None else 1
        # the pin thread's copy threads: only a ring's features are copied that way (cores read only then)
        threads = (self.pin_threads or pincopy.auto_threads(resources.available_cores(), ranks)) if ring else 1
        ahead = self._ahead() if self.read_ahead is None else bool(self.read_ahead)
        ds = self.stream(stage, train, collate, batch_size, start_epoch=start, ring_buffers=ring,
                         register_buffers=register, pin_threads=threads, pack_batches=self.pack_batches,
                         read_ahead=train and workers > 0 and ahead, limit=limit)
        if ds.ring_token:  # (training loaders only have rings)
            self._ring_tokens.append(ds.ring_token)
            self._copy_threads = threads
        nb = len(ds)
        if nb == 0 and ds.total > 0 and ds.world > 1:  # Lightning would stop every rank with a bare zero-length error
            raise ValueError(f"{self.root}: split {self.splits.get(stage, stage)} has {ds.total} sample(s), too few "
                             f"for {ds.world} processes (rank {ds.rank} gets none); run it with fewer processes "
                             f"(trainer.devices)")
        if workers > 1 and nb < workers:
            log.info("%s: split %s gives %d batch(es) per rank: %d of the %d loader worker(s) stay idle",
                     self.root, self.splits.get(stage, stage), nb, workers - nb, workers)
        if workers > 0:
            # validation runs while the training workers decode the next epoch (epoch_ahead): both in /dev/shm
            alongside = self._train_shm if (stage == "val" and not train and self._ahead()) else 0
            need = self.check_shared_memory(stage, workers, ds.batch_size, collate or self.collate, ring, alongside)
            if train:  # held during validation: its reused buffers, or one batch per worker of the next epoch
                self._train_shm = (need // max(self.prefetch_factor, ring)) * (ring or 1) if need else 0
                if pin:  # a GPU run: this node's ranks share its cores
                    check_cores(self.root, workers, ranks=ranks)
        kw = {"persistent_workers": True, "prefetch_factor": self.prefetch_factor,
              "worker_init_fn": worker_init} if workers > 0 else {}
        if workers > 0:  # forked, or from a server process (a GPU run: value_pl.data.loaders.start_method)
            method, preload = self._start_method(pin, collate or self.collate)
            kw["multiprocessing_context"] = worker_context(method, preload)
            self._start_methods[stage] = method
        if workers > 0 and self._ahead() and (train or stage == "val"):
            # training: an epoch's last batch starts the validation run that follows (then), else the next epoch;
            # validation: started by the training loader, and its first batch starts the next training epoch
            ahead = {"another_epoch": self._another_epoch, "then": self._validation_ahead} if train else \
                {"another_epoch": lambda: False, "on_first": self._training_ahead}
            return EpochAheadLoader(ds, batch_size=None, num_workers=workers, collate_fn=no_collate,
                                    pin_memory=pin, on_workers=self._started(stage), **ahead, **kw)
        return WorkerLoader(ds, batch_size=None, num_workers=workers, collate_fn=no_collate, pin_memory=pin,
                            on_workers=self._started(stage), **kw)

    def _started(self, stage: str):
        return lambda seconds: self._worker_starts.setdefault(stage, []).append(round(seconds, 3))

    def worker_starts(self) -> dict[str, list[float]]:
        """Per stage, the seconds that each start of its loader's workers took in the main process (the workers'
        processes forked or started from the forkserver, their queues and the pin thread made): once per run with
        persistent workers. A fork copies the main process's page tables, so it takes longer the more memory the
        process holds (on the 2-core CPU: ~3 ms at no resident memory, ~25 ms at 1 GiB, ~57 ms at 4 GiB); a start
        from the forkserver pickles each worker's dataset instead (:meth:`start_methods`)."""
        return {k: list(v) for k, v in self._worker_starts.items()}

    def start_methods(self) -> dict[str, str]:
        """Per stage, how its loader's worker processes were started (``fork``, ``forkserver``, ``spawn``:
        ``data.worker_start``)."""
        return dict(self._start_methods)

    def _ahead(self) -> bool:
        """Whether loaders start epochs and validation runs ahead (``epoch_ahead``; None: when the trainer's model
        runs on an accelerator). That keeps a GPU fed at an epoch's start; when the model itself runs on the CPU,
        decoding earlier only moves CPU time around (and into the last training step's), so it stays off there."""
        if self.epoch_ahead is not None:
            return bool(self.epoch_ahead)
        trainer = getattr(self, "trainer", None)
        return trainer is not None and getattr(trainer.strategy.root_device, "type", "cpu") != "cpu"

    def _validation_ahead(self, train_loader: "EpochAheadLoader") -> bool:
        """When the training loader has handed out an epoch's last batch: start the validation loader's workers on
        the validation run that follows the epoch, if the trainer runs one then (and reads this module's loaders).
        True if started: the training loader's next epoch then waits for the run's first batch
        (:meth:`_training_ahead`), so that the two do not compete for the CPU while that batch is decoded."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or getattr(trainer, "datamodule", None) is not self or not validates_after_epoch(trainer) \
                or getattr(trainer, "overfit_batches", 0):  # overfit_batches: Lightning reads rebuilt loaders
            return False
        loader = self._cached_loader("val", False)
        current = getattr(trainer, "val_dataloaders", None)
        if not isinstance(loader, EpochAheadLoader) or (current is not None and current is not loader):
            return False
        loader.start_ahead()
        self._deferred_train = train_loader
        return True

    def _training_ahead(self) -> None:
        """When the validation loader hands out a run's first batch: start the training loader's next epoch, light,
        if it waits for that (:meth:`EpochAheadLoader.start_deferred`, see :meth:`_validation_ahead`)."""
        loader, self._deferred_train = self._deferred_train, None
        if loader is not None:
            loader.start_deferred()

    def _another_epoch(self) -> bool:
        """Whether the trainer will read the training loader again after the epoch it is in (no trainer: yes)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return True
        nxt = int(trainer.current_epoch) + 1
        if trainer.should_stop and nxt >= int(getattr(trainer, "min_epochs", None) or 0):
            return False  # (Lightning trains on despite should_stop until min_epochs)
        max_epochs = trainer.max_epochs
        return max_epochs is None or max_epochs < 0 or nxt < int(max_epochs)

    def check_shared_memory(self, stage: str, workers: int, batch_size: int, collate, ring: int,
                            alongside: int = 0) -> int | None:
        """Warn when the batches a loader may hold in ``/dev/shm`` (the fp16 region features of ``prefetch_factor``
        batches per worker, or its ``ring`` reused buffers per worker, each sized by
        :func:`value_pl.data.handover.buffer_bytes`), plus ``alongside`` bytes that another loader holds at
        the same time, exceed its free space: a worker that runs out dies with a bus error (a container's default
        /dev/shm is 64 MB). Returns this loader's estimate in bytes (None: its batches carry no region features,
        e.g. a feature cache's or text-only ones)."""
        inner = getattr(collate, "collate", collate)  # extraction wraps the backbone's collator
        encoder = getattr(inner, "encoder", None)
        if encoder is None or getattr(inner, "text_only", False):
            return None
        dim = int(self.manifest.get("feature_dim") or 0)
        regions = self.split_entry(stage).get("max_regions")
        cap = getattr(encoder, "max_regions", None)
        if regions is None:
            regions = cap or 100  # shard sets written before max_regions was recorded: the collator's cap
        elif cap:
            regions = min(int(regions), int(cap))
        per_batch = int(batch_size) * int(regions) * dim * 2
        if not per_batch:
            return None
        held = max(self.prefetch_factor, ring)
        if ring:  # reused buffers are made a quarter larger, with room for the batch's other tensors
            per_batch = handover.buffer_bytes(per_batch)
        need = workers * held * per_batch
        free = shm_free()
        if free is not None and need + alongside > free:
            also = (f" plus {alongside / 2**20:,.0f} MiB that the training loader holds meanwhile (its reused buffers, "
                    f"or the first batches of its next epoch, which start during validation)" if alongside else "")
            what = "reused buffer(s)" if ring else "batch(es)"
            msg = (f"{self.root}: the {stage} loader may hold {need / 2**20:,.0f} MiB of batches in /dev/shm "
                   f"({workers} worker(s) x {held} {what} x {per_batch / 2**20:,.1f} MiB of fp16 region features)"
                   f"{also} but /dev/shm has {free / 2**20:,.0f} MiB free: a loader worker that runs out dies with a "
                   f"bus error. Lower data.num_workers, data.prefetch_factor or the batch size, or give the container "
                   f"more shared memory (docker run --shm-size=...)")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return need

    def _start_method(self, pin: bool, collate) -> tuple[str, list[str]]:
        """How a loader's workers start (``data.worker_start``; null: forkserver for pinned batches, else fork), and
        the modules a worker started from a server imports to unpickle its dataset. Under null, ``fork`` is kept
        where a worker could not do that safely (said once): a collator, decoder or transform that cannot be
        pickled, or that lives in a script's ``__main__``, or a script as the main module
        (:func:`value_pl.data.loaders.main_reimport_safe`). Asked for explicitly, a pickling failure is an error."""
        method = start_method(self.worker_start, pin)
        if method == "fork":
            return method, []
        auto = self.worker_start is None
        why = None
        try:
            mods = pickled_modules((collate, self.decode, self.transform))
        except Exception as e:  # noqa: BLE001 - whatever pickling raises
            why = (f"the loader's collator, decoder or transform cannot be pickled ({type(e).__name__}: {e}), so "
                   f"workers cannot be started from a {method} server")
            if not auto:
                raise ValueError(f"{self.root}: {why}: set data.worker_start=fork") from e
        if auto and why is None and not main_reimport_safe():
            why = (f"the main module {getattr(sys.modules.get('__main__'), '__file__', '?')} would be run again in "
                   f"the server and each worker (set data.worker_start=forkserver if its work is under "
                   f"if __name__ == '__main__')")
        elif auto and why is None and refers_to_main(mods):
            why = "the loader's collator, decoder or transform is defined in the main module"
        if why is None:
            return method, mods
        if not self._said_fork:
            log.warning("%s: loader workers are forked from this process, not started from a %s: %s", self.root,
                        method, why)
            self._said_fork = True
        return "fork", []

    def setup(self, stage: str | None = None) -> None:
        """At the start of ``fit``/``validate``/``test``: if workers will start from a forkserver, start it now, so
        that it imports while the trainer sets up rather than when the first loader waits for a worker."""
        if self.num_workers > 0 and self.collate is not None:
            method, preload = self._start_method(self._pin() and torch.cuda.is_available(), self.collate)
            if method == "forkserver":
                worker_context(method, preload)

    def _cached_loader(self, stage: str, train: bool):
        """One loader per stage for the whole run: workers persist across epochs and validation runs."""
        key = (stage, train, id(self.collate))
        if key not in self._loaders:
            self._loaders[key] = self.loader(stage, train)
        return self._loaders[key]

    def train_dataloader(self):
        loader = self._cached_loader("train", True)
        self._start_validation_workers()
        return loader

    def _start_validation_workers(self) -> None:
        """When epochs start ahead (a GPU run), start the validation loader's workers with the training loader's, at
        the run's start, light (one batch each). Otherwise the first validation run starts them, with the last
        batch of a training epoch: on a GPU that start (forking or sending each worker its dataset) stopped the
        training step, and in a run that validates only at its end, it fell on the last epoch (docs/performance.md).
        The batches are the ones that run reads anyway (persistent workers count their own epochs)."""
        trainer = getattr(self, "trainer", None)
        if (self.num_workers <= 0 or not self._ahead() or trainer is None
                or getattr(trainer, "datamodule", None) is not self or not getattr(trainer, "enable_validation", False)
                or getattr(trainer, "overfit_batches", 0)):
            return
        loader = self._cached_loader("val", False)
        if isinstance(loader, EpochAheadLoader) and loader._iterator is None:
            loader.start_ahead(light=True)

    def val_dataloader(self):
        return self._cached_loader("val", False)

    def test_dataloader(self):
        return self._cached_loader("test", False)

    def teardown(self, stage: str) -> None:
        for loader in self._loaders.values():
            if isinstance(loader, EpochAheadLoader):
                loader.shutdown()  # a run started ahead that nobody will read
        self._loaders.clear()
        self._train_shm = 0
        pinning.release(set(self._ring_tokens))  # lent buffers whose copies were queued: waited for and freed

    def buffer_stats(self) -> dict | None:
        """The training loaders' reused buffers' counts (:func:`value_pl.data.pinning.stats`; None: none used), with
        the threads that copied them into pinned memory (``copy_threads``) and whether batches were packed into
        them (``packed``: ``data.pack_batches``)."""
        out = pinning.stats(self._ring_tokens)
        if out is not None:
            out["copy_threads"] = self._copy_threads
            out["packed"] = self.pack_batches
        return out

    def on_exception(self, exception: BaseException) -> None:
        self.teardown("exception")  # Lightning calls only this on the way out of a failed run

    def label_counts(self, task: str, stage: str = "train") -> dict[str, int]:
        return self.split_entry(stage)["pairs"].get(task, {})
