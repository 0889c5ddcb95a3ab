"""Throughput of a training run: samples/s and the share of wall time the loop waited for data.

The window is an epoch's training batches (from the epoch's start to its last batch's end: validation
excluded). The wait is the time from the end of one training batch to the start of the next (fetching from
the loader workers and the host-to-device copy); the rest is the step itself. The share of the window that the
module's ``transfer_batch_to_device`` took (``transfer_frac``, part of the wait; None for a module that does not
time it) tells a loader that cannot keep up from a copy to the device that blocks. The wait before the epoch's first
batch (``first_wait_s``, part of the wait) tells a wait at the epoch's start (workers opening shards and filling
their shuffle buffers; the device idle after the previous epoch's closing synchronise) from one spread over the
steps. A run whose wait share is high is loader-bound (more workers, more shards per worker, or a feature cache); a
low share with a low rate is compute-bound. The seconds the garbage collector held the GIL within the window
(``gc_s``) and its full collections (``gc_full``) are counted too (:mod:`value_pl.driver.heap`). Figures per epoch go
to the logger (``perf/*``), the console and ``results.json``.
"""
from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

from .heap import GcClock


class ThroughputMonitor(pl.Callback):
    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.epochs: list[dict] = []
        self._t_end = None
        self._gc = GcClock()

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module):
        self._sync(pl_module)
        self._t0 = self._t_end = time.perf_counter()
        self._wait = 0.0
        self._first_wait = 0.0
        self._samples = 0
        self._pairs = 0
        self._batches = 0
        self._xfer = 0.0
        self._xfer_mark = getattr(pl_module, "transfer_s", None)
        self._gc.start()
        self._gc.reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._batches == 0:
            self._first_wait = now - self._t_end
        self._wait += now - self._t_end
        if self._xfer_mark is not None:  # this batch's transfer (a validation run's happen outside the window)
            self._xfer += pl_module.transfer_s - self._xfer_mark
        c = batch.get("counts", {}) if isinstance(batch, dict) else {}
        self._samples += int(c.get("samples", 0))
        self._pairs += int(c.get("pairs", 0))
        self._batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == trainer.num_training_batches:
            self._sync(pl_module)  # the epoch's last step has run on the device
        self._t_end = time.perf_counter()
        if self._xfer_mark is not None:
            self._xfer_mark = pl_module.transfer_s

    def on_train_epoch_end(self, trainer, pl_module):
        wall = max(self._t_end - self._t0, 1e-9)
        gc_s, gc_full = self._gc.reset()  # (up to now: a collection after the last batch is counted, rarely)
        world = trainer.world_size
        rec = {"epoch": int(trainer.current_epoch), "seconds": round(wall, 3), "batches": self._batches,
               "start": time.time() - (time.perf_counter() - self._t0), "end": time.time() - (time.perf_counter() - self._t_end),
               # every rank reads the same number of samples: the run's rate is world x this rank's
               "samples_per_s": world * self._samples / wall, "pairs_per_s": world * self._pairs / wall,
               "data_wait_frac": self._wait / wall, "first_wait_s": round(self._first_wait, 4), "world_size": world,
               "gc_s": round(gc_s, 4), "gc_full": gc_full,
               "transfer_frac": None if self._xfer_mark is None else self._xfer / wall}
        self.epochs.append(rec)
        pl_module.log_dict({"perf/samples_per_s": rec["samples_per_s"], "perf/data_wait_frac": rec["data_wait_frac"],
                             "perf/gc_s": rec["gc_s"],
                             **({} if rec["transfer_frac"] is None else {"perf/transfer_frac": rec["transfer_frac"]})},
                           rank_zero_only=True)
        if self.verbose and trainer.is_global_zero:
            print(f"[value-pl] epoch {rec['epoch']}: {rec['samples_per_s']:.0f} samples/s "
                  f"({rec['pairs_per_s']:.0f} pairs/s), waiting for data {100 * rec['data_wait_frac']:.0f}%"
                  + (f" (copying to the device {100 * rec['transfer_frac']:.0f}%)" if rec["transfer_frac"] else "")
                  + f" of {rec['seconds']:.1f} s" + (f", garbage collection {gc_s:.2f} s" if gc_s >= 0.01 else ""))

    def teardown(self, trainer, pl_module, stage):
        self._gc.stop()

    def summary(self) -> dict:
        """``results.json``'s ``throughput``: the last epoch (the first one includes worker start-up)."""
        if not self.epochs:
            return {}
        return {"train": dict(self.epochs[-1]), "epochs": [dict(e) for e in self.epochs]}
