"""Callbacks: ``ProbeCallback`` (Lightning) runs the probe suite on the current weights while *you* pretrain
(VALUE, App. C (iii)); ``SweepReport`` (Hydra, at the end of every ``-m`` multirun) builds the paper's tables
from the sweep's ``results.json`` files and logs them into the sweep's W&B group.

Add it to your own pretraining ``Trainer``::

    from value_pl.callbacks import ProbeCallback, attr_adapter

    cb = ProbeCallback(adapter=attr_adapter("encoder"),   # your LightningModule -> a value_pl Backbone
                       data="shards/demo", suite="quick", every_n_steps=1000)
    pl.Trainer(callbacks=[cb], ...).fit(my_pretraining_module, ...)

Every ``every_n_steps`` optimizer steps (or ``every_n_epochs`` epochs) it runs :func:`value_pl.compare.suite.run_suite`
on ``adapter(pl_module)`` and logs the metrics (``probe/fusion/nmi/mean``, ``probe/vrc/acc/best`` ...) to
every logger of the trainer at ``step=trainer.global_step``; ``cb.history`` keeps ``(step, metrics)``.

Training is left untouched: the backbone forward runs under ``torch.no_grad()`` (only the suite's own
small heads see gradients, with their own optimizer); every module's ``training`` flag and every
parameter's ``requires_grad`` are restored; the torch (CPU and CUDA), ``random`` and NumPy RNG states are
restored; nothing is moved between devices. Only global rank 0 runs the suite (``all_ranks=True``:
every rank, each logging nothing but rank 0); the other ranks go on and meet rank 0 at the next
collective, so the adapter must not run collectives (call the plain module, not the DDP wrapper).

The adapter protocol: ``adapter(pl_module)`` returns an object implementing the
:class:`~value_pl.backbones.base.Backbone` interface -- ``forward(batch, capture) -> BackboneOutput``,
``collator(task=None)``, ``pair_layout(kind)``, ``hidden_size``, ``num_heads``, ``kind``
(``"single"``/``"two"``) and ``parameters()`` (for the device). If your model *is* one of the value_pl
backbones (e.g. a :class:`~value_pl.backbones.uniter.UniterBackbone` you pretrain), ``attr_adapter``
returns it; otherwise wrap your encoder in a small ``Backbone`` subclass that maps its outputs to
canonical names (see ``value_pl/backbones/uniter.py`` for the pattern).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.experimental.callback import Callback as HydraCallback

from .compare.state import preserved
from .compare.suite import SuiteData, run_suite, suite_config

log = logging.getLogger("value_pl")


def attr_adapter(path: str) -> Callable:
    """``pl_module -> pl_module.<a>.<b>...``: for a module that holds a value_pl Backbone as an attribute."""

    def adapter(pl_module):
        obj = pl_module
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    adapter.__name__ = f"attr_adapter({path!r})"
    return adapter


@contextlib.contextmanager
def rng_preserved():
    """Restore the torch CPU/CUDA, Python ``random`` and NumPy global RNG states on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    npy = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


def _load_suite(suite) -> dict:
    if suite is None or suite == "quick":
        return suite_config()
    if isinstance(suite, (str, Path)):
        from omegaconf import OmegaConf

        p = Path(suite)
        if not p.exists():
            p = Path(__file__).resolve().parent.parent / "configs" / "suite" / f"{suite}.yaml"
        return suite_config(OmegaConf.load(p))
    return suite_config(suite)


class ProbeCallback(pl.Callback):
    """Run the probe suite every N steps or epochs of a user's pretraining run (see the module doc).

    adapter: ``pl_module -> Backbone``. data: a :class:`~value_pl.compare.suite.SuiteData` or a shard root (the
    samples are read once, on first use). suite: ``"quick"`` (default), ``"full"``, a YAML path, or a dict
    of overrides of :data:`value_pl.compare.suite.QUICK`. splits: ``{role: split name}`` for train/val/test.
    on_error: ``"warn"`` (default: a failing suite logs a warning and training goes on) or ``"raise"``.
    """

    def __init__(self, adapter: Callable, data, suite=None, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, at_start: bool = False, prefix: str = "probe/",
                 splits: dict | None = None, all_ranks: bool = False, on_error: str = "warn"):
        super().__init__()
        if not every_n_steps and not every_n_epochs and not at_start:
            raise ValueError("ProbeCallback needs every_n_steps, every_n_epochs or at_start")
        self.adapter = adapter
        self.suite = _load_suite(suite)
        self._data = data
        self.splits = splits
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.every_n_epochs = int(every_n_epochs) if every_n_epochs else None
        self.at_start = at_start
        self.prefix = prefix
        self.all_ranks = all_ranks
        if on_error not in ("warn", "raise"):
            raise ValueError("on_error must be 'warn' (log and go on training) or 'raise'")
        self.on_error = on_error
        self.history: list[tuple[int, dict]] = []
        self.seconds: list[float] = []  # wall time of each suite run
        self._last_step: int | None = None  # the last step probed (saved in checkpoints: see state_dict)
        self._batch_start_step: int | None = None

    # --------------------------------------------------------------------- data
    @property
    def data(self) -> SuiteData:
        if not isinstance(self._data, SuiteData):
            self._data = SuiteData.load(self._data, self.suite, self.splits)
        return self._data

    # -------------------------------------------------------------------- hooks
    def on_train_start(self, trainer, pl_module):
        if self.at_start:
            self._maybe_run(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = self.every_n_steps
        step, start = trainer.global_step, self._batch_start_step
        self._batch_start_step = None
        if not n or step <= 0:
            return
        # only on a batch whose optimizer step reached a multiple of n: under gradient accumulation the
        # other batches leave global_step where it was (also the first batches after a resume, whose
        # global_step is the checkpoint's, probed before it was saved)
        if (step % n == 0) if start is None else (start // n < step // n):
            self._maybe_run(trainer, pl_module)

    # ------------------------------------------------- state saved in checkpoints
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, every_n_steps=self.every_n_steps,
                                        every_n_epochs=self.every_n_epochs,
                                        adapter=getattr(self.adapter, "__name__", type(self.adapter).__name__))

    def state_dict(self) -> dict:
        """The last step probed: a run resumed from a checkpoint does not probe that step again."""
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        last = state_dict.get("last_step")
        self._last_step = None if last is None else int(last)

    def on_train_epoch_end(self, trainer, pl_module):
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self._maybe_run(trainer, pl_module)

    # ---------------------------------------------------------------------- run
    def _maybe_run(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.global_step == self._last_step:
            return
        if not (trainer.is_global_zero or self.all_ranks):
            return
        self._last_step = trainer.global_step
        t0 = time.perf_counter()
        try:
            metrics = self.run(pl_module)
        except Exception:  # state is restored by the context managers in run()
            if self.on_error == "raise":
                raise
            log.warning("ProbeCallback: the probe suite failed at step %d; training goes on",
                        trainer.global_step, exc_info=True)
            return
        self.seconds.append(round(time.perf_counter() - t0, 3))
        metrics = {f"{self.prefix}{k}": v for k, v in metrics.items() if v == v}
        self.history.append((int(trainer.global_step), metrics))
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)

    def run(self, pl_module) -> dict:
        """The suite on ``adapter(pl_module)`` with training state preserved; returns the metrics."""
        grad = torch.is_grad_enabled()
        try:
            with rng_preserved(), preserved(pl_module):
                backbone = self.adapter(pl_module)
                with preserved(backbone):
                    res = run_suite(backbone, self.suite, self.data)
        finally:
            torch.set_grad_enabled(grad)
        for part, why in res["skipped"].items():
            log.info("probe suite: %s not measured: %s", part, why)
        return res["metrics"]


class SweepReport(HydraCallback):
    """Hydra callback (``configs/train.yaml`` and ``configs/analyze.yaml``: ``hydra.callbacks.sweep_report``): when a
    multirun ends, build the report tables (:mod:`value_pl.report`) from every ``results.json`` and every analyze
    run's output under the sweep directory, write them to
    ``<sweep dir>/report/``, and -- under ``logger=wandb`` -- log them as one ``job_type=report`` run in the
    sweep's W&B group (:func:`value_pl.driver.setup.sweep_group`), whose summary holds every table cell.
    A report never fails a sweep: problems are printed."""

    def __init__(self, layout: str = "auto", enabled: bool = True):
        self.layout = layout
        self.enabled = enabled

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            self.report(config)
        except Exception as e:  # the sweep's own results are already written: a report never fails it
            log.warning("sweep report failed: %s", e, exc_info=True)

    def report(self, config) -> dict | None:
        from .driver.setup import sweep_group
        from .report import build_tables, load_analyses, load_runs, log_wandb, write_tables

        sweep_dir = Path(str(config.hydra.sweep.dir))
        runs = load_runs([sweep_dir]) if sweep_dir.is_dir() else []
        analyses = load_analyses([sweep_dir]) if sweep_dir.is_dir() else []
        if not runs and not analyses:
            log.warning("sweep report: no results.json or analyze output under %s, nothing to report (did the jobs "
                        "fail, or write elsewhere with run_dir=...? python -m value_pl.report <dirs> reports any "
                        "directories)", sweep_dir)
            return None
        tables = build_tables(runs, self.layout, analyses)
        n = len(runs) + len({Path(r["_path"]).parent for r in analyses})
        path = write_tables(tables, sweep_dir / "report", n)
        out = {"runs": n, "tables": [t.name for t in tables], "report": str(path), "group": None}
        lc = config.get("logger")
        if tables and lc and lc.get("name") == "wandb":
            group = lc.get("group") or sweep_group(config.hydra)
            os.environ.setdefault("WANDB_MODE", lc.get("mode", "offline"))
            log_wandb(tables, lc.get("project", "value-pl"), group=group, dir=str(sweep_dir))
            out["group"] = group
        print(f"[value-pl] sweep report: {n} runs -> {path}"
              + (f"; W&B group {out['group']} (run {out['group']}-report)" if out["group"] else ""))
        return out
