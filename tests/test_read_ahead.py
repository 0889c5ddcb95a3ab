"""A training worker that has made its epoch's last batch makes its next epoch's first one at once
(``data.read_ahead``, value_pl.data.stream.ShardStream): the same batches, only earlier.

Without it a persistent worker idles from its share's end until the next epoch's ``iter()``, whose first batch then
waits for a shard to open, the shuffle buffer to fill and a batch to be decoded. On the H200 that wait, at every
epoch's start, matched the share of time training waited for data (docs/performance.md)."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_epoch_ahead import MarkBatches, epochs, module, sample_keys, uneven  # noqa: F401 - uneven: a fixture
from value_pl.data.datamodule import ShardDataModule
from value_pl.data.stream import ShardStream


@pytest.mark.parametrize("workers,ahead", [(2, False), (3, False), (2, True)])
def test_read_ahead_gives_the_batches_of_a_plain_loader(uneven, workers, ahead):  # noqa: F811
    plain = module(uneven, ahead=False, workers=workers, read_ahead=False).train_dataloader()
    early = module(uneven, ahead=ahead, workers=workers, read_ahead=True).train_dataloader()
    assert early.dataset.read_ahead and not plain.dataset.read_ahead
    a, b = epochs(plain, 4), epochs(early, 4)
    assert a == b and a[0] != a[1]
    for ep in b:  # every sample once per epoch
        flat = [k for batch in ep for k in batch]
        assert len(flat) == len(set(flat)) == 30
    # an epoch left early: its workers never reached the end, so nothing was read ahead; the next epochs are exact
    plain2 = module(uneven, ahead=False, workers=workers, read_ahead=False).train_dataloader()
    early2 = module(uneven, ahead=ahead, workers=workers, read_ahead=True).train_dataloader()
    assert epochs(plain2, 3, {0: 2}) == epochs(early2, 3, {0: 2})


def made(folder: Path) -> int:
    return len(list(folder.iterdir()))


def wait_for(folder: Path, n: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and made(folder) < n:
        time.sleep(0.05)
    return made(folder)


def test_each_worker_makes_its_next_first_batch_when_its_epoch_ends_and_it_is_used(uneven, tmp_path):  # noqa: F811
    folder = tmp_path / "made"
    folder.mkdir()
    dm = module(uneven, ahead=False, workers=2, read_ahead=True)
    dm.collate = MarkBatches(folder)
    loader = dm.train_dataloader()
    first = list(loader)
    assert len(first) == 8
    # nobody has called iter() again (epoch_ahead is off): each of the 2 workers makes one batch of epoch 1, no more
    assert wait_for(folder, 10, 30) == 10
    time.sleep(1)
    assert made(folder) == 10
    second = list(loader)
    assert len(second) == 8 and second != first
    # epoch 1's first batches were not made again; and each worker read ahead once more (epoch 2's first batch)
    assert wait_for(folder, 18, 30) == 18
    time.sleep(0.5)
    assert made(folder) == 18
    # the batches are the plain loader's
    assert [first, second] == epochs(module(uneven, ahead=False, workers=2, read_ahead=False).train_dataloader(), 2)


def test_by_default_training_loaders_read_ahead_where_epochs_start_ahead(uneven):  # noqa: F811
    dm = ShardDataModule(uneven, batch_size=4, num_workers=2)
    dm.collate = sample_keys
    assert dm.read_ahead is None
    for device, on in (("cpu", False), ("cuda", True)):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), current_epoch=0)
        assert dm.loader("train", True).dataset.read_ahead is on
        assert dm.loader("val", False).dataset.read_ahead is False  # validation: never
    dm.read_ahead = False
    assert dm.loader("train", True).dataset.read_ahead is False
    dm.read_ahead, dm.trainer = True, None
    assert dm.loader("train", True).dataset.read_ahead is True
    assert dm.loader("train", True, num_workers=0).dataset.read_ahead is False  # the main process: never


def test_without_workers_nothing_is_read_ahead(uneven):  # noqa: F811
    """In the main process (no loader workers) reading ahead would stall training: the stream ignores the switch."""
    dm = module(uneven, ahead=False, workers=0)
    ds = dm.stream("train", True, read_ahead=True)
    assert isinstance(ds, ShardStream) and ds.read_ahead
    one = list(ds)
    assert ds._ahead is None and len(one) == 8
    assert list(ds) == epochs(module(uneven, ahead=False, workers=0).train_dataloader(), 2)[1]
