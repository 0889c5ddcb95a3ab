"""The main process's garbage collector during a run (``gc_freeze``): the objects alive at the start of fit are left
out of full collections, and are handed back after; the pauses are counted per epoch."""
import gc
import weakref

import pytest

from conftest import compose
from test_cache import FAST, small_demo, tiny_backbone
from value_pl.data.options import OptionError
from value_pl.driver.heap import GcClock, frozen_heap


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def unfrozen():
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


def test_frozen_heap_moves_what_is_alive_out_of_collections_and_back():
    before = Node()
    old = weakref.ref(before)
    with frozen_heap() as frozen:
        assert frozen
        # what was alive at entry is frozen: a full collection neither walks nor frees it
        assert gc.get_freeze_count() > 0
        inside_objects = {id(o) for o in gc.get_objects()}
        assert id(before) not in inside_objects
        del before
        gc.collect()
        assert old() is not None  # cyclic garbage among frozen objects waits for the end of the block
        made = Node()  # made inside: collected as usual
        new = weakref.ref(made)
        assert id(made) in {id(o) for o in gc.get_objects()}
        del made
        gc.collect()
        assert new() is None and old() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old() is None  # unfrozen: nothing leaked


def test_frozen_heap_off_or_already_frozen_changes_nothing():
    with frozen_heap(False) as frozen:
        assert not frozen and gc.get_freeze_count() == 0
    gc.freeze()  # the caller's own freeze (a pretraining loop): left as it is, not undone at the end
    n = gc.get_freeze_count()
    with frozen_heap() as frozen:
        assert not frozen and gc.get_freeze_count() == n
    assert gc.get_freeze_count() == n


def test_gc_clock_counts_collections_only_while_started():
    clock = GcClock()
    clock.start()
    clock.start()  # once
    gc.collect()
    gc.collect(0)
    seconds, full = clock.reset()
    assert full == 1 and seconds > 0
    assert clock.reset() == (0.0, 0)
    clock.stop()
    gc.collect()
    assert clock.reset() == (0.0, 0)
    clock.stop()  # twice: harmless


@pytest.mark.parametrize("freeze", [True, False])
def test_training_runs_with_the_heap_frozen_and_reports_collections(tmp_path, monkeypatch, freeze):
    from value_pl.driver.throughput import ThroughputMonitor
    from value_pl.driver.train import train

    seen = []
    start = ThroughputMonitor.on_train_epoch_start

    def spy(self, trainer, pl_module):
        seen.append(gc.get_freeze_count())
        return start(self, trainer, pl_module)

    monkeypatch.setattr(ThroughputMonitor, "on_train_epoch_start", spy)
    root = tmp_path / "demo"
    small_demo(root)
    res = train(compose(["prober=layer_emb", "task=vrc", f"data.root={root}", "data.num_workers=0",
                         *tiny_backbone(tmp_path), *FAST, "trainer.max_epochs=2", f"gc_freeze={str(freeze).lower()}",
                         f"run_dir={tmp_path / 'run'}"]))
    assert len(seen) == 2
    # the heap of a run (torch, Lightning, the backbone) is ~0.5 M objects; frozen, or not at all
    assert all(n > 10_000 for n in seen) if freeze else seen == [0, 0]
    assert gc.get_freeze_count() == 0  # handed back after the run
    for ep in res["throughput"]["epochs"]:
        assert ep["gc_s"] >= 0 and isinstance(ep["gc_full"], int) and ep["gc_full"] >= 0
        assert 0 < ep["transfer_frac"] <= ep["data_wait_frac"]  # ProbeModule times its batch transfers


def test_gc_freeze_must_be_a_boolean():
    from value_pl.driver.validate import check_run

    with pytest.raises(OptionError, match="gc_freeze='yes': must be true or false"):
        check_run(compose(["gc_freeze=yes"]))
