"""DataLoaders with persistent workers for :class:`value_pl.data.datamodule.ShardDataModule`: one that reports how
long each start of its worker processes took (:class:`WorkerLoader`), and one that also starts its next epoch before
it is asked for (:class:`EpochAheadLoader`), with Lightning's test of whether a validation run follows an epoch
(:func:`validates_after_epoch`); and how their worker processes are started (:func:`start_method`,
:func:`worker_context`)."""
from __future__ import annotations

import io
import logging
import multiprocessing
import pickle
import sys
import time

import torch

log = logging.getLogger(__name__)

#: ``data.worker_start``: how loader workers are started (null: :func:`start_method` chooses)
START_METHODS = ("fork", "forkserver", "spawn")
_PRELOAD = "value_pl.data.stream"  # what every worker runs: torch and the loader's code
_PRELOADED = False


def start_method(choice: str | None, pinned: bool) -> str:
    """``data.worker_start``, or when it is null: ``forkserver`` for a loader whose batches are pinned for a GPU, else
    ``fork``.

    A forked worker starts as a copy of the main process. In a GPU run that process holds GiBs (the CUDA libraries
    and context, the backbone, pinned buffers) and runs threads (the pin thread and its copy threads, CUDA's).
    Forking then costs the main process in three ways: the fork copies its page tables (tens of ms per worker), every
    page it writes afterwards while a worker lives is copied first (copy-on-write: on the 2-core CPU one write over 4
    GiB took 4.2-4.6 s with 2 forked workers alive instead of 15 ms; ``benchmarks/worker_start.py``), and a lock that another thread held at the fork stays held in the
    child for good. A validation loader's workers start in the middle of training (``data.epoch_ahead``), so all
    three fall on training steps. ``forkserver`` forks workers from a small server process started once, which has
    imported only what workers run: the main process sends each worker its dataset (pickled: the collator and its
    tokenizer, ~1 MB) and shares no memory with it. CPU runs keep ``fork``: there the main process is small, and
    ``fork`` starts a worker with no pickling. (The DataModule also keeps ``fork`` under null where a worker could
    not import the main module safely or unpickle the dataset: :func:`main_reimport_safe`.)"""
    if choice is None:
        return "forkserver" if pinned else "fork"
    if choice not in START_METHODS:
        raise ValueError(f"data.worker_start={choice!r}: must be one of {', '.join(START_METHODS)} (or null)")
    return choice


def _main() -> tuple[str | None, str | None]:
    """This process's ``__main__``: (its module name when run with ``-m``, its file)."""
    main = sys.modules.get("__main__")
    return getattr(getattr(main, "__spec__", None), "name", None), getattr(main, "__file__", None)


def main_reimport_safe() -> bool:
    """Whether a worker started from a server may import this process's ``__main__`` (it does, before it unpickles
    its dataset): one of value-pl's entry points (``python -m value_pl.train``), a package's ``__main__`` (``python
    -m pytest``: never imported by workers) or none (an interactive session). A script (``python my_probe.py`` that
    builds a ShardDataModule itself) would be run again as ``__mp_main__`` in the server and in each worker, all of
    it unless it keeps its work under ``if __name__ == "__main__":``; that cannot be known from here, so
    ``data.worker_start=null`` forks workers for it."""
    name, file = _main()
    if name:
        return name.startswith("value_pl.") or name.endswith(".__main__")
    return file is None


def _main_preload() -> list[str]:
    """What a spawned or forkserver worker imports as its ``__main__`` (``python -m value_pl.train``: that module,
    which imports Lightning, transformers and Hydra): preloaded into the server once, so that each worker only
    re-runs the module's few lines. Nothing for ``python -m pkg`` mains (``pkg.__main__``, e.g. pytest: never
    re-run in workers) or an interactive session."""
    name, file = _main()
    if name:
        return [] if name == "__main__" or name.endswith(".__main__") else [name]
    return ["__main__"] if file else []  # a script: the server imports it once


def pickled_modules(obj) -> list[str]:
    """The modules whose classes and functions pickling ``obj`` refers to: what a worker imports to unpickle its
    dataset (e.g. the tokenizer's, which alone takes ~1.5 s to import on the 2-core CPU). Raises what pickling
    raises (an object a worker started from a server cannot receive)."""
    mods: set[str] = set()

    class Recorder(pickle.Pickler):
        def persistent_id(self, o):
            for m in (getattr(o, "__module__", None) if isinstance(o, type) or callable(o) else None,
                      getattr(type(o), "__module__", None)):
                if isinstance(m, str) and m != "builtins":
                    mods.add(m)
            return None

    Recorder(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return sorted(mods)


def refers_to_main(modules: list[str]) -> bool:
    """Whether a pickle that refers to ``modules`` (:func:`pickled_modules`) needs the ``__main__`` module."""
    return any(m in ("__main__", "__mp_main__") for m in modules)


def worker_context(method: str, preload: list[str] = ()):
    """The multiprocessing context a DataLoader starts its workers with (:func:`start_method`). For ``forkserver``
    the server is started here, once per process, with the loader's code, ``preload`` (the modules the datasets'
    pickles refer to: :func:`pickled_modules`) and the main module imported: it imports them while the main process
    goes on, and the first worker start waits for that (once per run)."""
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        from multiprocessing import forkserver

        global _PRELOADED
        if not _PRELOADED:  # (read when the server starts: the first time, or again if it has died)
            mods = [m for m in preload if not refers_to_main([m])]  # (the main module: as _main_preload says)
            ctx.set_forkserver_preload(list(dict.fromkeys([_PRELOAD, *mods, *_main_preload()])))
            _PRELOADED = True
        t = time.perf_counter()
        forkserver.ensure_running()
        log.debug("forkserver for loader workers running (%.3f s)", time.perf_counter() - t)
    return ctx


def validates_after_epoch(trainer) -> bool:
    """Whether Lightning runs validation at the end of the training epoch it is in (its own test, from public
    attributes: validation enabled, this epoch a ``check_val_every_n_epoch`` one, the last batch a
    ``val_check_batch`` one). False where unsure, e.g. validation every n batches across epochs."""
    if not getattr(trainer, "enable_validation", False) or getattr(trainer, "sanity_checking", False):
        return False
    every = getattr(trainer, "check_val_every_n_epoch", None)
    if every is None or (int(trainer.current_epoch) + 1) % int(every):
        return False
    check, batches = getattr(trainer, "val_check_batch", None), getattr(trainer, "num_training_batches", None)
    if check is None or batches is None:
        return False
    return check == float("inf") or (batches != float("inf") and int(batches) % int(check) == 0)


class WorkerLoader(torch.utils.data.DataLoader):
    """A DataLoader that reports how long each start of its worker processes took (``on_workers(seconds)``)."""

    def __init__(self, *args, on_workers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_workers = on_workers

    def _get_iterator(self):
        t = time.perf_counter()
        it = super()._get_iterator()
        if self.num_workers > 0 and self._on_workers is not None:  # (persistent workers: the first epoch only)
            self._on_workers(time.perf_counter() - t)
        return it


class EpochAheadLoader(WorkerLoader):
    """A DataLoader with persistent workers that starts its next epoch before it is asked for.

    Torch resumes persistent workers only when the next ``iter()`` is called, so every epoch began with the whole
    pipeline empty: the first batch waited for a worker to read and collate ``batch_size`` samples (on the CPU more
    than half of an epoch's waiting for data; docs/performance.md). Here the epoch's iterator, when it hands out
    its last batch (``len(loader)`` -- exact per rank, and all Lightning reads), calls ``then()`` and, unless that
    returns True, ``iter()`` if ``another_epoch()`` says training goes on; the next ``iter()`` returns the iterator
    started ahead. The training loader's ``then()`` starts the validation run that follows, whose first batch
    (``on_first()``) starts the training loader's next epoch: the validation workers decode during the last
    training step, the training workers during the validation run. A loader whose ``another_epoch`` is never
    true (validation) is started by another through :meth:`start_ahead`.

    The batches are the ones a plain ``iter()`` would give: the same resume of the same workers, only earlier
    (each worker's stream counts its own epochs). An epoch left before its end (``limit_train_batches``,
    ``max_steps``) is not started ahead; one started but never read (training stopped) goes with the workers.
    """

    def __init__(self, *args, another_epoch=lambda: True, then=None, on_first=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._another_epoch = another_epoch
        self._then, self._on_first = then, on_first
        self._started = None  # the next epoch's iterator, started ahead
        self._top_up = 0  # started light: the requests to have made when it is iterated
        self._deferred = False  # the next epoch is to be started by start_deferred()
        self._current = None  # the epoch being read

    def shutdown(self) -> None:
        """Stop the workers (a run started ahead included); a later ``iter()`` starts fresh ones."""
        it = self._iterator
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._iterator = self._started = self._current = None
        self._deferred, self._top_up = False, 0

    def start_deferred(self) -> None:
        """Start the next epoch (light) if its start was left to what follows the last one (``then()`` returned
        True) and nothing has iterated this loader since: never inside an epoch, which would cut it short."""
        if self._deferred and (self._current is None or self._current.left <= 0):
            self._deferred = False
            if self._another_epoch():
                self.start_ahead(light=True)

    def __iter__(self):
        self._deferred = False
        it, self._started = self._started, None
        if it is not None and it is not self._iterator:
            it = None  # its workers were shut down since (Lightning's teardown resets a loader's iterator)
        if it is not None and self._top_up:  # an epoch started light: now the loader's full prefetch, counted from
            # what was asked for (nothing has been read from it yet), not from what the light start meant to ask
            for _ in range(max(0, self._top_up - int(getattr(it, "_tasks_outstanding", self._top_up)))):
                it._try_put_index()
        self._top_up = 0
        self._current = _AheadIterator(self, it if it is not None else super().__iter__())
        return self._current

    def start_ahead(self, light: bool = False) -> None:
        """Start the next epoch now (no-op if started). An epoch still being read ends here: what it has not read
        is dropped, as a plain ``iter()`` drops it. ``light``: each worker is asked for one batch until the epoch is
        iterated, not ``prefetch_factor``: enough to hide the epoch's start, while leaving the CPU to a validation
        run that comes first (batches and their order are the same: the round robin over the workers is)."""
        if self._started is not None:
            return
        if self._current is not None:
            self._current.left = 0  # never read the next epoch through it
        it = self._iterator
        if light and it is None and self.num_workers > 0 and isinstance(self.prefetch_factor, int):
            # the first start (the workers made now): one request per worker too, the rest when it is iterated
            full = self.prefetch_factor
            self.prefetch_factor = 1
            try:
                self._started = super().__iter__()
            finally:
                self.prefetch_factor = full
            self._started._prefetch_factor = full
            self._top_up = full * self.num_workers
            return
        full = getattr(it, "_prefetch_factor", None)
        if not light or not isinstance(full, int) or not hasattr(it, "_try_put_index"):
            self._started = super().__iter__()
            return
        it._prefetch_factor = 1
        try:
            self._started = super().__iter__()
        finally:
            it._prefetch_factor = full
        self._top_up = full * self.num_workers  # the requests a plain start would have made

    def _epoch_read(self) -> None:
        if self._then is not None and self._then(self):  # what follows this epoch (validation) starts the next one
            self._deferred = True
            return
        if self._another_epoch():
            self.start_ahead(light=True)

    def _first_read(self) -> None:
        if self._on_first is not None:
            self._on_first()


class _AheadIterator:
    """One epoch of an :class:`EpochAheadLoader`: ``len(loader)`` batches, then the next epoch is started."""

    def __init__(self, loader: EpochAheadLoader, it):
        self.loader, self.it = loader, it
        self.n = self.left = len(loader)

    def __iter__(self):
        return self

    def __len__(self):
        return self.n

    def __next__(self):
        if self.left <= 0:  # the workers may already serve the next epoch: never read it through this iterator
            raise StopIteration
        try:
            batch = next(self.it)
        except StopIteration:
            self.left = 0
            self.loader._epoch_read()
            raise
        first = self.left == self.n
        self.left -= 1
        if first:
            self.loader._first_read()
        if self.left == 0:
            self.loader._epoch_read()
        return batch
