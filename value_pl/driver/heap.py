"""The main process's garbage collector during a run (``gc_freeze``, on by default).

By the time training starts, the main process holds ~0.5 M objects that the cyclic garbage collector tracks (torch,
transformers, Lightning and Hydra as imported, the backbone's modules, the tokenizer) and that live as long as the
run. Every full (generation 2) collection walks all of them while holding the GIL: 0.1-0.3 s on the 2-core CPU, in
the middle of a training epoch, with the loader's pin thread stopped too. :func:`frozen_heap` collects once, then
moves those objects to the permanent generation (:func:`gc.freeze`) for the duration of ``fit``/``test``: full
collections then walk only what the run itself made. Objects freed by reference counting (nearly all) are freed as
before; cyclic garbage among the frozen objects waits until the context ends, when they are unfrozen. Loader workers
forked inside it also leave those objects' pages unwritten (no copy-on-write from the collector).

:class:`GcClock` measures the pauses: seconds in collections and the number of full ones, per window
(:class:`value_pl.driver.throughput.ThroughputMonitor` reports them per epoch: ``gc_s``, ``gc_full``).
"""
from __future__ import annotations

import contextlib
import gc
import time


@contextlib.contextmanager
def frozen_heap(enabled: bool = True):
    """Freeze the objects alive now for the duration of the block; unfreeze after. Nothing happens when disabled or
    when the heap is already frozen (by the caller: a pretraining loop that froze its own)."""
    if not enabled or gc.get_freeze_count():
        yield False
        return
    gc.collect()
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()


class GcClock:
    """Time spent in garbage collections (any thread: a collection holds the GIL) while started."""

    def __init__(self):
        self.seconds = 0.0
        self.collections = [0, 0, 0]  # per generation
        self._t0 = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.collections[min(int(info.get("generation", 0)), 2)] += 1
            self._t0 = None

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def reset(self) -> tuple[float, int]:
        """(seconds, full collections) since the last reset; counting starts again."""
        out = (self.seconds, self.collections[2])
        self.seconds, self.collections = 0.0, [0, 0, 0]
        return out
