"""Throughput of a training run: samples/s and the share of wall time the loop waited for data.

The window is an epoch's training batches (from the epoch's start to its last batch's end: validation
excluded). The wait is the time from the end of one training batch to the start of the next (fetching from
the loader workers and the host-to-device copy); the rest is the step itself. A run whose wait share is high is
loader-bound (more workers, more shards per worker, or a feature cache); a low share with a low rate is
compute-bound. Figures per epoch go to the logger (``perf/*``), the console and ``results.json``.
"""
from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


class ThroughputMonitor(pl.Callback):
    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.epochs: list[dict] = []
        self._t_end = None

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module):
        self._sync(pl_module)
        self._t0 = self._t_end = time.perf_counter()
        self._wait = 0.0
        self._samples = 0
        self._pairs = 0
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        self._wait += now - self._t_end
        c = batch.get("counts", {}) if isinstance(batch, dict) else {}
        self._samples += int(c.get("samples", 0))
        self._pairs += int(c.get("pairs", 0))
        self._batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == trainer.num_training_batches:
            self._sync(pl_module)  # the epoch's last step has run on the device
        self._t_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        wall = max(self._t_end - self._t0, 1e-9)
        world = trainer.world_size
        rec = {"epoch": int(trainer.current_epoch), "seconds": round(wall, 3), "batches": self._batches,
               "start": time.time() - (time.perf_counter() - self._t0), "end": time.time() - (time.perf_counter() - self._t_end),
               # every rank reads the same number of samples: the run's rate is world x this rank's
               "samples_per_s": world * self._samples / wall, "pairs_per_s": world * self._pairs / wall,
               "data_wait_frac": self._wait / wall, "world_size": world}
        self.epochs.append(rec)
        pl_module.log_dict({"perf/samples_per_s": rec["samples_per_s"], "perf/data_wait_frac": rec["data_wait_frac"]},
                           rank_zero_only=True)
        if self.verbose and trainer.is_global_zero:
            print(f"[value-pl] epoch {rec['epoch']}: {rec['samples_per_s']:.0f} samples/s "
                  f"({rec['pairs_per_s']:.0f} pairs/s), waiting for data {100 * rec['data_wait_frac']:.0f}% of "
                  f"{rec['seconds']:.1f} s")

    def summary(self) -> dict:
        """``results.json``'s ``throughput``: the last epoch (the first one includes worker start-up)."""
        if not self.epochs:
            return {}
        return {"train": dict(self.epochs[-1]), "epochs": [dict(e) for e in self.epochs]}
