"""How loader workers start (``data.worker_start``): forked from the main process, or from a forkserver (the default
for batches pinned for a GPU). Either way a loader yields the same batches, and a run the same results."""
from __future__ import annotations

import json

import pytest

from conftest import compose
from test_cache import FAST, small_demo, tiny_backbone
from value_pl.data.collate import TaskSpec
from value_pl.data.datamodule import ShardDataModule
from value_pl.data.loaders import START_METHODS, pickled_modules, start_method
from value_pl.data.options import OptionError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers") / "demo"
    man = small_demo(root, splits={"train": 30, "val": 14, "test": 6}, maxcount=7)
    return root, man


@pytest.fixture(scope="module")
def collate(tmp_path_factory, demo):
    """The real collator of a tiny UNITER (its tokenizer is what a worker started from a server unpickles)."""
    from omegaconf import OmegaConf

    from value_pl.backbones.uniter import build_uniter

    tmp = tmp_path_factory.mktemp("bb")
    cfg = dict(o.split("=", 1) for o in tiny_backbone(tmp))
    bb = build_uniter(OmegaConf.create({"pretrained": False, "config": cfg["backbone.config"],
                                        "tokenizer": cfg["backbone.tokenizer"], "seed": 0}),
                      img_dim=demo[1]["feature_dim"])
    return bb.collator(TaskSpec("vrc", "region_region", demo[1]["labels"]["vrc"]))


def plain(x):
    if hasattr(x, "tolist"):
        return (str(x.dtype), x.tolist())
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def batches(root, collate, method, stage, train, epochs=2):
    dm = ShardDataModule(root, batch_size=4, num_workers=2, seed=3, prefetch_factor=2, worker_start=method)
    dm.collate = collate
    loader = dm.loader(stage, train)
    out = [[plain(b) for b in loader] for _ in range(epochs)]
    assert dm.start_methods() == {stage: method}
    loader._iterator._shutdown_workers()
    return out


def test_the_default_is_a_forkserver_for_pinned_batches_and_fork_otherwise():
    assert start_method(None, pinned=True) == "forkserver"
    assert start_method(None, pinned=False) == "fork"
    for m in START_METHODS:
        assert start_method(m, pinned=True) == start_method(m, pinned=False) == m
    with pytest.raises(ValueError, match="data.worker_start='thread': must be one of fork, forkserver, spawn"):
        start_method("thread", pinned=False)
    with pytest.raises(OptionError, match="data.worker_start='thread': must be one of fork, forkserver, spawn or null"):
        from value_pl.driver.validate import check_run

        check_run(compose(["data.worker_start=thread"]))


@pytest.mark.parametrize("stage,train", [("train", True), ("val", False)])
def test_workers_from_a_forkserver_yield_the_batches_forked_ones_do(demo, collate, stage, train):
    """Shuffled training epochs and an evaluation split: the same batches, in the same order, tensors and keys."""
    forked = batches(demo[0], collate, "fork", stage, train)
    served = batches(demo[0], collate, "forkserver", stage, train)
    assert served == forked
    assert sum(len(b["keys"]) for b in forked[0]) == demo[1]["splits"][stage]["samples"]
    if train:
        assert forked[0] != forked[1]  # (a reshuffled second epoch)


def test_a_worker_imports_what_its_dataset_pickle_refers_to(collate):
    mods = pickled_modules((collate, len))
    assert type(collate).__module__ in mods
    assert type(collate.encoder.tokenizer).__module__ in mods  # the tokenizer's: ~1.5 s to import, preloaded once
    with pytest.raises(Exception, match="lambda|pickle"):
        pickled_modules(lambda b: b)


def test_a_collator_that_cannot_be_pickled_keeps_fork_by_default_and_is_an_error_when_asked(demo, caplog):
    dm = ShardDataModule(demo[0], batch_size=4, num_workers=2)
    dm.collate = lambda samples: samples  # noqa: E731 - what a notebook might pass
    with caplog.at_level("WARNING"):
        assert dm._start_method(True, dm.collate) == ("fork", [])
        assert dm._start_method(True, dm.collate) == ("fork", [])
    said = [r.getMessage() for r in caplog.records if "cannot be pickled" in r.getMessage()]
    assert len(said) == 1 and str(demo[0]) in said[0] and "forked from this process" in said[0]
    dm.worker_start = "forkserver"
    with pytest.raises(ValueError, match="cannot be pickled .* set data.worker_start=fork"):
        dm._start_method(False, dm.collate)


def test_a_run_with_workers_from_a_forkserver_equals_a_forked_one(tmp_path, demo):
    from value_pl.driver.train import train

    common = ["prober=layer_emb", "task=vrc", f"data.root={demo[0]}", "data.num_workers=2", *tiny_backbone(tmp_path),
              *FAST, "trainer.max_epochs=2", "data.train_batches=null"]
    res = {m: train(compose(common + [f"data.worker_start={m}", f"run_dir={tmp_path / m}"]))
           for m in ("fork", "forkserver")}
    for m, r in res.items():
        assert r["throughput"]["worker_start_method"] == {"train": m, "val": m, "test": m}
        assert json.loads((tmp_path / m / "results.json").read_text())["throughput"]["worker_start_method"]["val"] == m
    keep = ("layers", "samples_seen", "pairs_evaluated", "best")
    assert {k: res["fork"][k] for k in keep} == {k: res["forkserver"][k] for k in keep}


def fake_main(monkeypatch, name=None, file=None):
    import sys
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=name) if name else None
    if file:
        main.__file__ = file
    monkeypatch.setitem(sys.modules, "__main__", main)
    return main


def test_a_script_as_main_keeps_fork_by_default_and_entry_points_do_not(demo, collate, monkeypatch, caplog):
    """A worker started from a server imports the main module first: our entry points and a package's __main__ are
    safe to import, a script may run its whole work again (unless guarded): null keeps fork for it, and says so."""
    from value_pl.data.loaders import main_reimport_safe

    dm = ShardDataModule(demo[0], batch_size=4, num_workers=2)
    for name, file, safe in (("value_pl.train", "/x/value_pl/train.py", True), ("pytest.__main__", "/x/p.py", True),
                             (None, None, True), (None, "/home/me/pretrain.py", False), ("mypkg.run", "/r.py", False)):
        fake_main(monkeypatch, name, file)
        assert main_reimport_safe() is safe, (name, file)
        dm._said_fork = False
        with caplog.at_level("WARNING"):
            caplog.clear()
            got = dm._start_method(True, collate)
        assert got[0] == ("forkserver" if safe else "fork"), (name, file)
        if not safe:
            assert f"main module {file} would be run again" in caplog.text
    dm.worker_start = "forkserver"  # asked for: the user vouches for the script's guard
    assert dm._start_method(True, collate)[0] == "forkserver"


class MainCollate:
    def __call__(self, samples):
        return samples


def test_a_collator_defined_in_main_keeps_fork_by_default(demo, monkeypatch, caplog):
    main = fake_main(monkeypatch, "value_pl.train", "/x/value_pl/train.py")
    monkeypatch.setattr(MainCollate, "__module__", "__main__")
    main.MainCollate = MainCollate
    dm = ShardDataModule(demo[0], batch_size=4, num_workers=2)
    with caplog.at_level("WARNING"):
        assert dm._start_method(True, MainCollate()) == ("fork", [])
    assert "defined in the main module" in caplog.text
