"""The training loader starts its next epoch while the current one ends (value_pl.data.loaders.EpochAheadLoader).

Without it every epoch began with an empty pipeline: the first batch waited for a worker to read and collate a whole
batch (on the CPU benchmark more than half of an epoch's waiting for data). Started ahead, an epoch must still be
exactly the epoch a plain loader reads: the same batches in the same order, every sample once.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from test_cache import small_demo
from value_pl.data.datamodule import ShardDataModule
from value_pl.data.loaders import EpochAheadLoader, validates_after_epoch


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("ahead") / "demo"
    small_demo(root, splits={"train": 30, "val": 6, "test": 6}, maxcount=7)  # 5 shards, the last one short
    return root


def sample_keys(batch):
    return [s["key"] for s in batch]


class MarkBatches:
    """A collate that also leaves a file per batch it makes: what the workers did, seen from outside them."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, batch):
        (self.folder / f"{time.monotonic_ns()}-{batch[0]['key']}").touch()
        return sample_keys(batch)


def module(root, ahead: bool, workers: int = 2, **kw) -> ShardDataModule:
    dm = ShardDataModule(root, batch_size=4, num_workers=workers, seed=3, prefetch_factor=2, epoch_ahead=ahead, **kw)
    dm.collate = sample_keys
    return dm


def epochs(loader, n: int, stop_after: dict | None = None) -> list[list[list[str]]]:
    out = []
    for e in range(n):
        got = []
        for i, b in enumerate(loader):
            got.append(b)
            if stop_after and stop_after.get(e) == i + 1:
                break
        out.append(got)
    return out


def test_epochs_started_ahead_are_the_epochs_a_plain_loader_reads(uneven):
    plain = module(uneven, ahead=False).train_dataloader()
    ahead = module(uneven, ahead=True).train_dataloader()
    assert isinstance(ahead, EpochAheadLoader) and not isinstance(plain, EpochAheadLoader)
    a, b = epochs(plain, 4), epochs(ahead, 4)
    assert a == b
    for ep in b:  # each epoch: every sample once, 8 batches (30 samples, batch 4: the last one partial)
        flat = [k for batch in ep for k in batch]
        assert len(ep) == len(ahead) == 8 and len(flat) == len(set(flat)) == 30
    assert a[0] != a[1]  # the epochs differ (seeded per epoch), so equality above is not trivially true
    # an epoch left early (limit_train_batches, max_steps) is not started ahead; the next one is still exact
    plain2 = module(uneven, ahead=False).train_dataloader()
    ahead2 = module(uneven, ahead=True).train_dataloader()
    assert epochs(plain2, 3, {0: 2}) == epochs(ahead2, 3, {0: 2})


def test_an_epoch_started_ahead_whose_workers_were_shut_down_is_not_read(uneven):
    """Lightning's teardown shuts a loader's workers down and drops its iterator (CombinedLoader.reset); an epoch
    started ahead before that (training stopped early) must give way to fresh workers, as a plain loader does."""
    got = []
    for ahead in (False, True):
        loader = module(uneven, ahead=ahead).train_dataloader()
        first = list(loader)
        loader._iterator._shutdown_workers()
        loader._iterator = None
        got.append((first, list(loader)))
    assert got[0] == got[1]


def test_the_next_epoch_is_decoded_before_it_is_asked_for(uneven, tmp_path):
    def run(ahead: bool, folder: Path, wait_s: float):
        folder.mkdir()
        dm = module(uneven, ahead=ahead, workers=2)
        dm.collate = MarkBatches(folder)
        loader = dm.train_dataloader()
        assert len(list(loader)) == 8
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and len(list(folder.iterdir())) <= 8:
            time.sleep(0.05)
        return loader, len(list(folder.iterdir())) - 8

    loader, ahead_made = run(True, tmp_path / "ahead", 30)
    assert ahead_made > 0  # the workers work on epoch 1 although nobody has called iter() again
    made = lambda: len(list((tmp_path / "ahead").iterdir())) - 8  # noqa: E731
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and made() < 2:
        time.sleep(0.05)
    time.sleep(1)
    # started light: one batch per worker (not prefetch_factor = 2), leaving the CPU to a validation run
    assert made() == 2
    assert len(list(loader)) == 8
    _, plain_made = run(False, tmp_path / "plain", 3)
    assert plain_made == 0  # a plain loader's workers wait for the next iter() (watched for 3 s)


def test_no_epoch_is_started_after_the_last_one(uneven):
    dm = module(uneven, ahead=True)
    loader = dm.train_dataloader()
    dm.trainer = SimpleNamespace(should_stop=False, max_epochs=2, current_epoch=0)
    list(loader)
    assert loader._started is not None
    dm.trainer.current_epoch = 1  # the last epoch of max_epochs=2
    list(loader)
    assert loader._started is None
    dm.trainer = SimpleNamespace(should_stop=True, max_epochs=10, current_epoch=1)  # early stopping
    list(loader)
    assert loader._started is None
    dm.trainer = SimpleNamespace(should_stop=False, max_epochs=-1, current_epoch=50)  # max_steps only
    list(loader)
    assert loader._started is not None
    # should_stop before min_epochs: Lightning trains on
    dm.trainer = SimpleNamespace(should_stop=True, max_epochs=10, current_epoch=1, min_epochs=5)
    list(loader)
    assert loader._started is not None


def test_teardown_stops_the_workers_of_a_run_started_ahead(uneven):
    dm = module(uneven, ahead=True)
    loader = dm.train_dataloader()
    list(loader)
    workers = list(loader._started._workers)
    assert workers and all(w.is_alive() for w in workers)
    dm.on_exception(RuntimeError("a failed run"))  # what Lightning calls on the way out of a failed fit
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers) and loader._started is None and not dm._loaders


def test_by_default_only_a_model_on_an_accelerator_gets_epochs_started_ahead(uneven):
    """Decoding earlier keeps a GPU fed; with the model on the CPU it only moves CPU time around."""
    dm = ShardDataModule(uneven, batch_size=4, num_workers=2)
    dm.collate = sample_keys
    assert dm.epoch_ahead is None and not dm._ahead()  # no trainer
    for device, on in (("cpu", False), ("cuda", True), ("mps", True)):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), current_epoch=0)
        assert dm._ahead() is on
        assert isinstance(dm.loader("train", True), EpochAheadLoader) is on
    dm.epoch_ahead = False
    assert not dm._ahead()
    dm.epoch_ahead, dm.trainer = True, None
    assert dm._ahead()


def test_a_validation_run_inside_an_epoch_never_cuts_it_short(uneven):
    """The next epoch waits for the validation run after the epoch; if that run did not come (Lightning decided
    otherwise) and the next epoch began plainly, a validation run inside that epoch must not start another."""
    dm = module(uneven, ahead=True)
    loader = dm.train_dataloader()
    # "a validation run follows and will start the next epoch"
    loader._then = lambda train_loader: setattr(dm, "_deferred_train", train_loader) or True
    first = list(loader)
    assert loader._deferred and loader._started is None
    it = iter(loader)  # ... but it never came: the next epoch starts plainly
    got = [next(it) for _ in range(3)]
    dm._training_ahead()  # a validation run inside the epoch hands out its first batch
    assert loader._started is None
    got += list(it)
    ref = epochs(module(uneven, ahead=False).train_dataloader(), 2)
    assert [first, got] == ref
    loader._then = None


def test_validation_is_started_only_when_it_follows_the_epoch():
    def tr(**kw):
        base = dict(enable_validation=True, sanity_checking=False, check_val_every_n_epoch=1, current_epoch=0,
                    val_check_batch=8, num_training_batches=8)
        return SimpleNamespace(**{**base, **kw})

    assert validates_after_epoch(tr())
    assert validates_after_epoch(tr(val_check_batch=float("inf")))
    assert validates_after_epoch(tr(val_check_batch=4))  # twice an epoch, the second time at its end
    assert not validates_after_epoch(tr(val_check_batch=3))  # the last check before the end
    assert not validates_after_epoch(tr(enable_validation=False))  # limit_val_batches=0, no validation_step
    assert not validates_after_epoch(tr(check_val_every_n_epoch=2))  # epoch 0 of every 2
    assert validates_after_epoch(tr(check_val_every_n_epoch=2, current_epoch=1))
    assert not validates_after_epoch(tr(check_val_every_n_epoch=None))  # every n batches across epochs: not said
    assert not validates_after_epoch(tr(sanity_checking=True))


class KeysModule(pl.LightningModule):
    """Records the sample keys of every training and validation batch per epoch, whether the next training epoch
    and the validation run had been started when the epoch's last training step ran, and whether the next training
    epoch had been started when the validation run's first step ran."""

    def __init__(self, dm: ShardDataModule | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.dm = dm
        self.seen: dict[int, list[str]] = {}
        self.val_seen: dict[int, list[str]] = {}
        self.started_at_end: list[tuple[bool, bool]] = []
        self.train_started_in_validation: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch)
        if batch_idx + 1 == self.trainer.num_training_batches:
            train = self.trainer.train_dataloader
            val = self.dm._loaders.get(("val", False, id(self.dm.collate))) if self.dm is not None else None
            self.started_at_end.append((getattr(train, "_started", None) is not None,
                                        getattr(val, "_started", None) is not None))
        return (self.w ** 2).sum() + 1.0

    def validation_step(self, batch, batch_idx):
        self.val_seen.setdefault(self.current_epoch, []).extend(batch)
        if batch_idx == 0:
            self.train_started_in_validation.append(getattr(self.trainer.train_dataloader, "_started", None) is not None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, m, tmp_path, **kw):
    trainer = pl.Trainer(**{**dict(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                   default_root_dir=str(tmp_path)), **kw})
    trainer.fit(m, datamodule=dm)
    return trainer


@pytest.mark.parametrize("ahead", [False, True])
def test_inside_trainer_fit_every_epoch_is_exact(uneven, tmp_path, ahead):
    """Lightning reads ``len(loader)`` batches and never asks for one more: the next epoch and the validation run
    must be started on the last batch, and every epoch and validation run must still read each sample once, the same
    as without starting ahead."""
    dm = module(uneven, ahead=ahead, eval_batch_size=4)
    m = KeysModule(dm)
    fit(dm, m, tmp_path)
    ref = epochs(module(uneven, ahead=False).train_dataloader(), 3)
    assert [m.seen[e] for e in range(3)] == [[k for b in ep for k in b] for ep in ref]
    assert all(len(set(m.seen[e])) == 30 for e in range(3))
    val = sorted(f"demo_val_{i:05d}" for i in range(6))
    assert [sorted(m.val_seen[e]) for e in range(3)] == [val] * 3
    # every epoch's validation run is started with its last batch, and the next epoch with the validation run's first
    # batch (so that the two do not compete for the CPU); the last epoch starts no successor (max_epochs)
    assert m.started_at_end == ([(False, True)] * 3 if ahead else [(False, False)] * 3)
    assert m.train_started_in_validation == ([True, True, False] if ahead else [False] * 3)


class FirstBatchProbe(KeysModule):
    """Also records, at the first training step, which loaders have started workers and what the validation
    loader's started run has asked its workers for."""

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 0 and batch_idx == 0:
            val = self.dm._loaders.get(("val", False, id(self.dm.collate)))
            it = getattr(val, "_started", None)
            self.at_first_step = (sorted(self.dm.worker_starts()), getattr(it, "_tasks_outstanding", None),
                                  getattr(val, "_top_up", None))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("ahead", [False, True])
def test_the_validation_workers_start_with_the_run_light_when_epochs_start_ahead(uneven, tmp_path, ahead):
    """Started ahead (a GPU run), the validation loader's workers start with the training loader's, before the first
    step, each asked for one batch (the rest of its prefetch when the run is read): never in the middle of training.
    Otherwise the first validation run starts them. Either way each validation run reads every sample once."""
    dm = module(uneven, ahead=ahead, eval_batch_size=4)
    m = FirstBatchProbe(dm)
    fit(dm, m, tmp_path, check_val_every_n_epoch=3)
    starts, asked, top_up = m.at_first_step
    if ahead:
        assert starts == ["train", "val"] and asked == 2 and top_up == 2 * 2  # 2 workers x 1; then x prefetch 2
    else:
        assert starts == ["train"] and asked is None
    assert sorted(m.val_seen) == [2] and sorted(m.val_seen[2]) == sorted(f"demo_val_{i:05d}" for i in range(6))
    assert {k: len(v) for k, v in dm.worker_starts().items()} == {"train": 1, "val": 1}


def test_no_validation_run_is_started_where_none_follows(uneven, tmp_path):
    dm = module(uneven, ahead=True, eval_batch_size=4)
    m = KeysModule(dm)
    fit(dm, m, tmp_path, check_val_every_n_epoch=2)
    # no validation after epochs 0 and 2: epoch 1 is started with epoch 0's last batch (the first validation run's
    # workers were started with the run, and wait unread); after epoch 1 (validated) the validation run starts, and
    # epoch 2 with its first batch; after epoch 2 nothing is started
    assert m.started_at_end == [(True, True), (False, True), (False, False)]
    assert m.train_started_in_validation == [True]
    assert sorted(m.val_seen) == [1]


def test_fit_without_the_datamodule_starts_the_training_epochs_only(uneven, tmp_path):
    """fit() given the loader alone: no trainer to ask, so the last epoch's successor is started too (and dropped)."""
    dm = module(uneven, ahead=True)
    m = KeysModule()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(m, train_dataloaders=dm.train_dataloader())
    assert m.started_at_end == [(True, False), (True, False)]
    assert ("val", False, id(dm.collate)) not in dm._loaders


@pytest.mark.parametrize("ahead", [False, True])
def test_each_start_of_a_loaders_workers_is_timed_once_per_run(uneven, ahead):
    """Persistent workers start once per run, whether epochs are started ahead or not: that start (forking the
    worker processes, which takes longer the more memory the main process holds) is what ``worker_start_s`` in
    results.json reports, per split; a loader without workers reports nothing."""
    dm = module(uneven, ahead=ahead)
    loader = dm.train_dataloader()
    assert epochs(loader, 3) and dm.worker_starts().keys() == {"train"}
    list(dm.val_dataloader())
    list(dm.val_dataloader())
    got = dm.worker_starts()
    assert got.keys() == {"train", "val"} and all(len(v) == 1 and v[0] > 0 for v in got.values())
    dm.teardown("fit")
    fresh = module(uneven, ahead=ahead, workers=0)
    assert epochs(fresh.train_dataloader(), 2) and fresh.worker_starts() == {}
