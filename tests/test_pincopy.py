"""The pin thread's copy of a batch's features into pinned memory on several intra-op threads (value_pl.data.pincopy):
the copy made with the training loader's thread count (as configured, or chosen from the cores), the pin thread's
own count restored after (also on failure) and no other thread's touched, the copy exact, and with real loader
workers every batch equal to the one collated in this process."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from test_handover import features_per_sample, shards  # noqa: F401  (the module-scoped shard fixture)

from value_pl.data import handover, packing, pincopy
from value_pl.data.datamodule import ShardDataModule


def _in_a_pin_thread(fn):
    """``fn()`` in a fresh thread with one intra-op thread, as torch's pin loop runs; returns (its result, the
    thread's intra-op count after)."""
    out = {}

    def run():
        torch.set_num_threads(1)
        try:
            out["result"] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
        out["after"] = torch.get_num_threads()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["result"], out["after"]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_the_copy_runs_on_n_intra_op_threads_of_the_pin_thread_only(n, monkeypatch):
    seen = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self, device=None: seen.append(torch.get_num_threads()) or self.clone())
    main = torch.get_num_threads()
    src = torch.rand(8, 36, 2048).half()
    got, after = _in_a_pin_thread(lambda: pincopy.pinned(src, n))
    assert torch.equal(got, src) and seen == [n]
    assert after == 1  # the pin thread's own count is back
    assert torch.get_num_threads() == main  # and no other thread's changed


def test_a_failed_copy_still_restores_the_count(monkeypatch):
    def fails(self, device=None):
        raise RuntimeError("pinning failed")

    monkeypatch.setattr(torch.Tensor, "pin_memory", fails)
    with pytest.raises(RuntimeError, match="pinning failed"):
        _in_a_pin_thread(lambda: pincopy.pinned(torch.ones(4), 3))
    _, after = _in_a_pin_thread(lambda: None)
    assert after == 1


@pytest.mark.parametrize("shape,dtype", [((37, 36, 2048), torch.float16), ((3, 1_500_001), torch.float32),
                                         ((9_000_001,), torch.uint8)])
def test_a_copy_on_several_intra_op_threads_is_exact(shape, dtype):
    """What Tensor.pin_memory() does inside the block (a copy_ into new memory), on this CPU's intra-op threads."""
    src = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 200).to(dtype)

    def copy():
        with pincopy.intra_op_threads(3):
            assert torch.get_num_threads() == 3
            return torch.empty_like(src).copy_(src)

    got, after = _in_a_pin_thread(copy)
    assert torch.equal(got, src) and after == 1


def test_thread_counts_are_checked_and_chosen_from_the_cores():
    assert [pincopy.auto_threads(c) for c in (1, 2, 4, 8, 16, 32, 128)] == [1, 1, 1, 2, 4, 4, 4]
    assert pincopy.auto_threads(64, ranks=8) == 2 and pincopy.auto_threads(16, ranks=4) == 1
    for bad in (0, pincopy.MAX_THREADS + 1):
        with pytest.raises(ValueError, match="data.pin_threads"):
            pincopy.want("bad", bad)
    assert pincopy.threads("never set") == 1


def test_each_training_loader_gets_its_configured_or_chosen_count(shards, monkeypatch):  # noqa: F811
    from value_pl.data import datamodule, resources

    root, collate = shards
    monkeypatch.setattr(datamodule.torch.cuda, "is_available", lambda: True)  # a GPU run's pinned loader
    monkeypatch.setattr(datamodule, "shm_free", lambda path="/dev/shm": 10 ** 12)
    for cores, configured, want in ((16, None, 4), (4, None, 1), (64, None, 4), (4, 3, 3)):
        monkeypatch.setattr(resources, "available_cores", lambda c=cores: c)
        dm = ShardDataModule(root, batch_size=4, num_workers=1, seed=0, pin_memory=True, epoch_ahead=False,
                             pin_threads=configured)
        dm.collate = collate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: pin_memory set but no accelerator
            ds = dm.loader("train", train=True).dataset
        assert pincopy.threads(ds.ring_token) == want and dm._copy_threads == want
    with pytest.raises(ValueError, match="data.pin_threads"):
        ShardDataModule(root, batch_size=4, pin_threads=0)


def test_copies_out_of_real_workers_buffers_on_several_threads_are_exact(shards, monkeypatch):  # noqa: F811
    """Two real workers write their reused buffers while the pin step (run here in a thread as the DataLoader's pin
    thread runs it on a GPU) copies each batch out -- features and the tensors packed after them, in one call -- on
    3 intra-op threads: every batch's features are the in-process ones, every batch took the copy path, and the
    buffers were reused (no batch needed a one-off segment)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from value_pl.data import datamodule, resources

    root, collate = shards
    threads = []  # the intra-op threads of each pin_memory() call (no accelerator here: it clones)
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self, device=None: threads.append(torch.get_num_threads()) or self.clone())
    monkeypatch.setattr(datamodule.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(resources, "available_cores", lambda: 64)
    monkeypatch.setattr(datamodule, "shm_free", lambda path="/dev/shm": 10 ** 12)
    want = features_per_sample(root, collate)
    dm = ShardDataModule(root, batch_size=4, num_workers=2, seed=0, pin_memory=True, prefetch_factor=2,
                         pin_threads=3)
    dm.collate = collate
    batches = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dl = dm.loader("train", train=True)
        for epoch in range(2):
            for b in dl:
                assert isinstance(b[packing.RING_KEY], handover.RingBatch)
                threads.clear()
                b = _in_a_pin_thread(lambda b=b: pin_memory(b))[0]  # the DataLoader's pin thread, on a GPU
                assert threads == [3]  # the whole batch, packed in its buffer: one copy
                b = packing.unpack(b)
                for i, k in enumerate(b["keys"]):
                    r = int(b["region_mask"][i].sum())
                    assert torch.equal(b["region_feats"][i, :r], want.pop((epoch, k))[:r]), (epoch, k)
                batches += 1
    assert not want and batches > 0
    s = dm.buffer_stats()
    assert s["copy_path_batches"] == batches and s["fallback_batches"] == 0 and s["copy_threads"] == 3
