"""Batches crossing from loader workers to the main process (value_pl.data.handover).

What crosses must be exactly what the collator built: small tensors by value, features through a shared
segment, and -- with reused buffers (pinned GPU batches) -- never a buffer that a worker is writing while the
main process has not copied it out yet, however slowly the main process consumes.
"""
from __future__ import annotations

import gc
import pickle
import random
import time
import warnings
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from helpers_backbones import tiny_tokenizer
from test_cache import small_demo

from value_pl.data import handover, packing
from value_pl.data.collate import Collator, InputEncoder, TaskSpec
from value_pl.data.datamodule import ShardDataModule
from value_pl.data.loaders import pickled_modules, worker_context
from value_pl.data.stream import no_collate, worker_init


def crossed(obj):
    """``obj`` pickled as a loader worker pickles its results, and unpickled (in this process)."""
    return pickle.loads(ForkingPickler.dumps(obj))


def test_small_tensors_travel_by_value_and_arrive_as_a_plain_dict():
    feats = torch.empty(0, dtype=torch.float16).set_(torch.UntypedStorage._new_shared(2 * 600_000), 0,
                                                     (3, 200, 1000))
    feats.normal_()
    big = torch.arange(300_000, dtype=torch.int64)  # 2.4 MB: over INLINE_BYTES, crosses as a segment
    batch = {"input_ids": torch.tensor([[2, 7, 3], [2, 9, 0]]), "text_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "a_valid": torch.tensor([[True, False]]), "region_boxes": torch.rand(2, 4, 7),
             "region_feats": feats, "big": big, "rows": {"region": torch.tensor([[0, 1, -1]])},
             "keys": ["a", "b"], "counts": {"samples": 2}, "pair_modalities": ("region", "region")}
    got = crossed(handover.Handover(batch))
    assert type(got) is dict and type(got["rows"]) is dict
    assert set(got) == set(batch)
    for k in ("input_ids", "text_mask", "a_valid", "region_boxes", "region_feats", "big"):
        assert got[k].dtype == batch[k].dtype and torch.equal(got[k], batch[k]), k
    for k in ("input_ids", "text_mask", "a_valid", "region_boxes"):  # by value: an ordinary, writable tensor
        assert not got[k].is_shared()
        got[k].add_(0) if got[k].dtype != torch.bool else got[k].logical_not_()
    assert got["region_feats"].is_shared() and got["big"].is_shared()
    assert torch.equal(got["rows"]["region"], batch["rows"]["region"])
    assert got["keys"] == ["a", "b"] and got["counts"] == {"samples": 2}
    assert got["pair_modalities"] == ("region", "region")


def out_of(ring_batch) -> torch.Tensor:
    """The features of a ring batch that holds only them, copied out (the buffer is free after)."""
    (feats,) = ring_batch.copy_out(torch.clone).tensors()
    return feats


def test_a_ring_buffer_is_reused_only_after_its_batch_was_copied_out():
    ring = handover.Ring("unit", max_buffers=2)
    a = ring.tensor((2, 3), torch.float16)
    a.fill_(1)
    fa = crossed(ring.ref(a))  # first use of buffer 0: its segment crosses
    b = ring.tensor((2, 3), torch.float16)
    assert b.data_ptr() != a.data_ptr()  # buffer 0 is still unread
    b.fill_(2)
    fb = crossed(ring.ref(b))
    c = ring.tensor((2, 3), torch.float16)  # both busy, at the cap: a one-off segment, not a busy buffer
    assert ring.fallbacks == 1 and c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    c.fill_(4)
    assert ring.ref(c) is None
    fc = crossed(ring.fallback(c))  # crosses as an ordinary tensor, counted by the main process
    assert type(fc) is torch.Tensor and fc.is_shared() and torch.equal(fc, torch.full((2, 3), 4, dtype=torch.float16))
    assert handover.pinning.stats(["unit"])["fallback_batches"] == 1
    assert torch.equal(out_of(fa), torch.ones(2, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="already copied out"):
        fa.copy_out(torch.clone)
    d = ring.tensor((2, 3), torch.float16)
    assert d.data_ptr() == a.data_ptr()  # buffer 0 again, now free
    ref = ring.ref(d)
    assert ref.buffer is None  # the main process has it mapped already: only its index crosses
    d.fill_(3)
    fd = crossed(ref)
    del fb  # dropped unread (a loader shut down mid-epoch): its buffer is free again
    gc.collect()
    e = ring.tensor((2, 3), torch.float16)
    assert e.data_ptr() == b.data_ptr() and ring.fallbacks == 1
    assert torch.equal(out_of(fd), torch.full((2, 3), 3, dtype=torch.float16))
    handover.forget("unit")


def test_a_buffer_too_small_is_retired_and_the_main_process_forgets_it():
    ring = handover.Ring("retire", max_buffers=1)
    a = ring.tensor((4,), torch.float32)
    out_of(crossed(ring.ref(a)))
    assert set(handover._OPEN["retire"]) == {(ring.pid, 0)}
    old = handover._OPEN["retire"][(ring.pid, 0)]
    big = ring.tensor((100_000,), torch.float32)  # no free buffer is big enough and the ring is full: replace it
    big.copy_(torch.arange(100_000.0))
    ref = ring.ref(big)
    assert ref.retired == [0] and ref.buffer is not None
    got = out_of(crossed(ref))
    assert torch.equal(got, torch.arange(100_000.0))
    assert handover._OPEN["retire"][(ring.pid, 0)].data_ptr() != old.data_ptr()
    handover.forget("retire")
    assert "retire" not in handover._OPEN


def a_batch(feats: torch.Tensor) -> dict:
    """A collated pair batch's kinds of values (int64, bool, float32 tensors; nested rows; keys, counts, a tuple)."""
    return {"input_ids": torch.tensor([[2, 7, 3], [2, 9, 0]]), "region_feats": feats,
            "region_boxes": torch.rand(2, 4, 7), "a_valid": torch.tensor([[True], [False]]),
            "a_pos": torch.arange(6).view(3, 2).t(),  # not contiguous
            "empty": torch.zeros(0, 3, dtype=torch.int64), "rows": {"region": torch.tensor([[0, 1, -1]])},
            "keys": ["a", "b"], "counts": {"samples": 2}, "pair_modalities": ("region", "region")}


def same_batch(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
        elif type(v) is dict:
            same_batch(got[k], v)
        else:
            assert got[k] == v, k


def test_a_ring_batch_travels_whole_in_its_buffer_and_unpacks_to_the_collated_dict():
    """Every tensor of a batch whose features are in a ring buffer is written into that buffer: what crosses is a
    message of a few hundred bytes (slots, the layout, keys, counts); unpacked, it is the collator's dict, in order."""
    ring = handover.Ring("pack", max_buffers=2)
    feats = ring.tensor((2, 5, 8), torch.float16)
    feats.normal_()
    batch = a_batch(feats)
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    msg = ForkingPickler.dumps(handover.leave(batch, ring))
    got = pickle.loads(msg)
    assert type(got) is dict and isinstance(got[packing.RING_KEY], handover.RingBatch)
    assert all(isinstance(got[k], packing.Slot) for k in ("input_ids", "region_feats", "a_valid", "a_pos", "empty"))
    assert isinstance(got["rows"]["region"], packing.Slot)
    assert len(msg) < 1500 + len(pickle.dumps(ring.buffers[0]))  # no tensor by value (the segment: first use only)
    out = packing.unpack(got)
    same_batch(out, want)
    assert packing.RING_KEY not in out
    assert int(ring._flag(0)[0]) == 0  # copied out: the worker may write the buffer again
    assert all(t.data_ptr() % packing.ALIGN == 0 for t in (out["input_ids"], out["region_boxes"], out["a_valid"]))
    again = ring.tensor((2, 5, 8), torch.float16)  # the same buffer, reused: only its index crosses now
    again.fill_(1)
    msg = ForkingPickler.dumps(handover.leave(a_batch(again), ring))
    assert len(msg) < 1500
    assert torch.equal(packing.unpack(pickle.loads(msg))["region_feats"], torch.ones(2, 5, 8, dtype=torch.float16))
    handover.forget("pack")


def test_tensors_that_do_not_fit_cross_by_value_counted_and_the_next_buffer_has_room():
    ring = handover.Ring("room", max_buffers=1)
    feats = ring.tensor((2, 3), torch.float16)
    feats.fill_(2)
    batch = {"region_feats": feats, "input_ids": torch.arange(40_000).view(2, -1), "keys": ["a", "b"]}
    got = crossed(handover.leave(batch, ring))  # 320 KB of ids: more than a new buffer's 64 KiB of spare room
    assert isinstance(got["region_feats"], packing.Slot) and type(got["input_ids"]) is torch.Tensor
    assert handover.pinning.stats(["room"])["inline_batches"] == 1
    out = packing.unpack(got)
    assert torch.equal(out["region_feats"], torch.full((2, 3), 2, dtype=torch.float16))
    assert torch.equal(out["input_ids"], torch.arange(40_000).view(2, -1))
    feats = ring.tensor((2, 3), torch.float16)  # the ring now keeps room for them: the buffer is replaced
    feats.fill_(3)
    got = crossed(handover.leave({"region_feats": feats, "input_ids": torch.arange(40_000).view(2, -1)}, ring))
    assert isinstance(got["input_ids"], packing.Slot) and handover.pinning.stats(["room"])["inline_batches"] == 1
    out = packing.unpack(got)
    assert torch.equal(out["input_ids"], torch.arange(40_000).view(2, -1)) and float(out["region_feats"][0, 0]) == 3
    handover.forget("room")


def test_the_pin_thread_pins_a_packed_batch_with_one_call_and_the_transfer_copies_it_once(monkeypatch):
    """What the packing is for: each torch call of the pin thread gives up the GIL (and waits to take it back while
    the main thread runs Python). A packed batch is one pin_memory() call and one copy to the device."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from value_pl.data.pinning import to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self, device=None: calls.append(self.numel()) or self.clone())
    real_to = torch.Tensor.to
    moved = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(self.numel()) or real_to(self, *a, **k))
    ring = handover.Ring(handover.new_token(ring_owner := type("Owner", (), {})()), max_buffers=2)
    feats = ring.tensor((2, 5, 8), torch.float16)
    feats.normal_()
    batch = a_batch(feats)
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    pinned = pin_memory(crossed(handover.leave(batch, ring)))  # the DataLoader's pin thread
    assert len(calls) == 1 and isinstance(pinned[packing.RING_KEY], packing.Packed)
    meta = to_device(pinned, torch.device("meta"))
    assert len(moved) == 1 and moved[0] == calls[0]  # the whole block, once
    assert meta["region_feats"].device.type == "meta" and meta["rows"]["region"].shape == (1, 3)
    same_batch(to_device(pinned, torch.device("cpu")), want)  # on the block's own device: views, no copy
    assert len(moved) == 1
    del ring_owner


def test_a_layout_past_its_buffer_is_a_clear_error():
    ring = handover.Ring("overrun", max_buffers=1)
    t = ring.tensor((4,), torch.float16)
    ref = ring.ref(t, [(0, "float16", (4,)), (1 << 20, "int64", (8,))])
    with pytest.raises(RuntimeError, match="overruns ring buffer 0"):
        crossed(ref)
    handover.forget("overrun")


def test_packed_views_are_checked():
    with pytest.raises(ValueError, match="contiguous 1-d uint8"):
        packing.views(torch.zeros(64, dtype=torch.int64), [])
    with pytest.raises(ValueError, match="shorter than its layout"):
        packing.views(torch.zeros(64, dtype=torch.uint8), [(0, "int64", (9,))])
    with pytest.raises(ValueError, match="unknown dtype 'nope'"):
        packing.views(torch.zeros(64, dtype=torch.uint8), [(0, "nope", (1,))])


def test_unknown_ring_buffer_is_a_clear_error():
    with pytest.raises(RuntimeError, match="was never sent"):
        handover._open_ring_batch("nope", 1, 0, None, [(0, "float16", (2,))], False, [])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("handover") / "demo"
    man = small_demo(root, splits={"train": 40, "val": 37, "test": 8}, maxcount=9)
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    from transformers import BertTokenizerFast

    collate = Collator(InputEncoder(BertTokenizerFast.from_pretrained(tok), "uniter7"),
                       TaskSpec("vrc", "region_region", man["labels"]["vrc"]))
    return root, collate


def _batches(root, collate, workers: int, ring: int, stage: str = "val", slow: bool = False, pack: bool = True,
             start: str | None = None) -> dict:
    """keys of each batch -> every tensor of it, read with ``workers`` loader workers (ring: reused buffers; pack:
    the batch's other tensors packed into them too; start: how the workers start, None: forked)."""
    dm = ShardDataModule(root, batch_size=4, eval_batch_size=3, num_workers=workers, seed=0, pin_memory=False)
    dm.collate = collate
    ds = dm.stream(stage, stage == "train", ring_buffers=ring, pack_batches=pack)
    kw = {"prefetch_factor": 2, "worker_init_fn": worker_init, "persistent_workers": True} if workers else {}
    if start:
        kw["multiprocessing_context"] = worker_context(start, pickled_modules(collate))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=no_collate, **kw)
    rng = random.Random(0)
    out, packed = {}, 0
    for epoch in range(2):
        for b in dl:
            if packing.RING_KEY in b:  # packed: no tensor crosses by value (not packed: all but the features do)
                assert isinstance(b["region_feats"], packing.Slot)
                slots = [k for k, v in b.items() if isinstance(v, packing.Slot)]
                by_value = [k for k, v in (*b.items(), *b["rows"].items()) if isinstance(v, torch.Tensor)]
                assert (not by_value) if pack else (slots == ["region_feats"] and "input_ids" in by_value)
                packed += 1
                if slow:
                    time.sleep(rng.uniform(0, 0.03))  # the workers run ahead while this batch is unread
                b = packing.unpack(b)  # copied out of its buffer, which is free after
            key = (epoch, tuple(b["keys"]))
            assert key not in out
            out[key] = b
    assert bool(packed) == bool(ring)
    if ring:
        assert ds.ring_token in handover._OPEN  # the ring was used: its buffers are mapped here
        assert 0 < len(handover._OPEN[ds.ring_token]) <= workers * ring
    token = ds.ring_token
    del dl, ds, dm
    gc.collect()
    assert token is None or token not in handover._OPEN  # forgotten with its loader
    return out


def features_per_sample(root, collate) -> dict:
    """(epoch, sample key) -> its row of the batch features, over the 2 training epochs read in this process."""
    out = {}
    for (epoch, keys), b in _batches(root, collate, 0, 0, stage="train").items():
        for i, k in enumerate(keys):
            out[(epoch, k)] = b["region_feats"][i]
    return out


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        x, y = a[key], b[key]
        assert set(x) == set(y)
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (key, k)
            elif k == "rows":
                assert all(torch.equal(x[k][j], y[k][j]) for j in x[k]), (key, k)
            else:
                assert x[k] == y[k], (key, k)


@pytest.mark.parametrize("ring", [0, 1, 2])
def test_worker_batches_equal_in_process_batches(shards, ring):
    """Two workers, a consumer slower than the workers, 1 or 2 buffers per worker (so buffers are reused and
    run out): every batch equals the one collated in this process, features included."""
    root, collate = shards
    ref = _batches(root, collate, 0, 0)
    _same(_batches(root, collate, 2, ring, slow=True), ref)
    per_sample = features_per_sample(root, collate)
    # training order differs by worker count (each worker shuffles its own part): compare per sample
    got = _batches(root, collate, 2, ring, stage="train", slow=True)
    n = 0
    for (epoch, keys), b in got.items():
        for i, k in enumerate(keys):
            f = per_sample.pop((epoch, k))
            r = int(b["region_mask"][i].sum())
            assert torch.equal(b["region_feats"][i, :r], f[:r]), (epoch, k)
            assert not b["region_feats"][i, r:].any()
            n += 1
    assert n == 80 and not per_sample


def test_unpacked_ring_batches_equal_in_process_batches(shards):
    """data.pack_batches=false: only the features go through the ring buffer, the rest by value, as before."""
    root, collate = shards
    _same(_batches(root, collate, 2, 2, slow=True, pack=False), _batches(root, collate, 0, 0))


def test_ring_batches_from_workers_started_by_a_forkserver_equal_in_process_batches(shards):
    """data.worker_start=forkserver (the default on a GPU): the workers share no memory with this process but their
    ring buffers, whose segments reach it once each, as from forked workers."""
    root, collate = shards
    _same(_batches(root, collate, 2, 2, slow=True, start="forkserver"), _batches(root, collate, 0, 0))


def test_ring_only_for_pinned_training_batches(shards):
    root, collate = shards
    dm = ShardDataModule(root, batch_size=4, num_workers=2, seed=0, pin_memory=True)
    dm.collate = collate
    dl = dm.loader("train", train=True)
    assert dl.dataset.ring_buffers == (dm.prefetch_factor + 2 if torch.cuda.is_available() else 0)
    assert dl.pin_memory == torch.cuda.is_available()
    assert dm.loader("val", train=False).dataset.ring_buffers == 0  # eval buffers would stay resident
    assert np.isclose(handover.INLINE_BYTES, 1 << 20)


def test_a_loader_that_may_overfill_dev_shm_is_warned_about(shards, monkeypatch):
    """Real-width batches in a container's default 64 MB /dev/shm: said at start, not a bus error later."""
    from value_pl.data import datamodule

    root, collate = shards
    dm = ShardDataModule(root, batch_size=4, num_workers=2, seed=0, pin_memory=False, epoch_ahead=True)
    dm.collate = collate
    regions = dm.split_entry("train")["max_regions"]
    assert regions > 0  # recorded by the writer
    per_batch = 4 * regions * dm.manifest["feature_dim"] * 2
    monkeypatch.setattr(datamodule, "shm_free", lambda path="/dev/shm": 10 ** 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dm.loader("train", train=True)
    assert dm.check_shared_memory("train", 2, 4, collate, 0) == 2 * dm.prefetch_factor * per_batch
    # reused buffers: each a quarter larger than a batch's features, with room for its other tensors
    assert dm.check_shared_memory("train", 2, 4, collate, 6) == 2 * 6 * handover.buffer_bytes(per_batch)
    assert handover.buffer_bytes(per_batch) >= per_batch * 5 // 4 + 64 * 1024
    monkeypatch.setattr(datamodule, "shm_free", lambda path="/dev/shm": per_batch)
    with pytest.warns(RuntimeWarning, match=r"/dev/shm .*bus error.*data.num_workers"):
        dm.loader("train", train=True)
    # validation runs while the training workers decode the next epoch: both loaders' batches count
    # (the training loader holds one batch per worker of its next epoch, started light, while validation runs)
    monkeypatch.setattr(datamodule, "shm_free", lambda path="/dev/shm": (2 * dm.prefetch_factor + 1) * per_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dm.loader("train", train=True)  # 2 workers x prefetch: fits
        dm.loader("val", train=False, batch_size=4, num_workers=1)  # with the training loader's 2 batches: fits
        dm.loader("test", train=False, batch_size=4)  # tested after training: alone
    with pytest.warns(RuntimeWarning, match=r"plus .* MiB that the training loader holds meanwhile"):
        dm.loader("val", train=False, batch_size=4)  # 2 x prefetch + 2 batches do not
    dm.epoch_ahead = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dm.loader("val", train=False, batch_size=4)
    # batches without region features (a feature cache's, text-only ones) are not estimated
    from value_pl.data.cache import CacheCollate

    assert dm.check_shared_memory("train", 2, 4, CacheCollate([], {}, []), 0) is None


def test_more_workers_than_half_the_cores_is_warned_about_on_a_gpu_run(shards, monkeypatch):
    """On an H200 host with 16 cores, 8 loader workers fed training faster than 12 or 15 (the main process, which
    drives the GPU, and its pin thread competed with them): a pinned training loader with more workers than half the
    cores says so at start, naming the key and a count to try; fewer workers, or an unpinned (CPU) run, do not."""
    from value_pl.data import datamodule, resources

    root, collate = shards
    monkeypatch.setattr(resources, "available_cores", lambda: 4)
    monkeypatch.setattr(datamodule, "shm_free", lambda path="/dev/shm": 10 ** 12)
    assert not resources.check_cores(root, 2)
    with pytest.warns(RuntimeWarning, match="data.num_workers=3 on 4 CPU cores"):
        assert resources.check_cores(root, 3, cores=4) is True
    assert not resources.check_cores(root, 8, cores=64, ranks=4)  # 16 cores per GPU: 8 workers each is fine
    with pytest.warns(RuntimeWarning, match=r"data.num_workers=8 on 64 CPU cores shared by 8 processes .*"
                                            r"try data.num_workers=4"):
        assert resources.check_cores(root, 8, cores=64, ranks=8)
    monkeypatch.setattr(datamodule.torch.cuda, "is_available", lambda: True)  # a GPU run's pinned loader
    for workers, warned in ((3, True), (2, False)):
        dm = ShardDataModule(root, batch_size=4, num_workers=workers, seed=0, pin_memory=True, epoch_ahead=False)
        dm.collate = collate
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            loader = dm.loader("train", train=True)
            dm.loader("val", train=False)  # evaluation loaders are not checked (said once, for training)
        said = [str(w.message) for w in got if "CPU cores" in str(w.message)]
        assert loader.pin_memory and len(said) == int(warned)
        if warned:
            assert said[0].startswith(str(root)) and "data.num_workers=3 on 4 CPU cores" in said[0]
            assert said[0].endswith("try data.num_workers=2")
    dm = ShardDataModule(root, batch_size=4, num_workers=3, seed=0, pin_memory=False)  # a CPU run: not pinned
    dm.collate = collate
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dm.loader("train", train=True)


def test_lent_buffers_with_real_workers_are_reused_only_after_their_copy(shards, monkeypatch):
    """data.register_buffers with two real workers (as on a GPU: pinned training batches, the pin thread's call made
    here), a consumer slower than the workers and copies that complete one transfer late: every batch's features
    are the in-process ones and stay untouched until their copy completes; every buffer is registered once, and
    freed and unregistered when the loader is gone."""
    from test_pinning import META, use_fake_cuda
    from torch.utils.data._utils.pin_memory import pin_memory

    from value_pl.data import datamodule, pinning, resources

    root, collate = shards
    fake = use_fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, device=None: self.clone())  # no accelerator here
    monkeypatch.setattr(datamodule.torch.cuda, "is_available", lambda: True)  # the loader decides to pin
    monkeypatch.setattr(resources, "available_cores", lambda: 64)
    monkeypatch.setattr(datamodule, "shm_free", lambda path="/dev/shm": 10 ** 12)
    want = features_per_sample(root, collate)
    dm = ShardDataModule(root, batch_size=4, num_workers=2, seed=0, pin_memory=True, prefetch_factor=2,
                         register_buffers=True)
    dm.collate = collate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: pin_memory set but no accelerator
        dl = dm.loader("train", train=True)
        assert dl.dataset.ring_buffers == 2 + 2 + pinning.extra_buffers(2)
        rng, in_flight, batches, lent = random.Random(0), [], 0, 0
        for epoch in range(2):
            for b in dl:
                b = pin_memory(b)  # the DataLoader's pin thread, on a GPU
                block = b[packing.RING_KEY].block if packing.RING_KEY in b else None  # else a one-off segment
                on_cpu = packing.unpack(b)  # views of the lent buffer (or of the pinned copy)
                feats = on_cpu["region_feats"]
                lent += block is not None and fake.covers(block)
                time.sleep(rng.uniform(0, 0.02))  # the workers run ahead
                pinning.to_device(b, META)  # releases the copies completed since the last call
                if block is not None and fake.covers(block):
                    in_flight.append((fake.events[-1], block, block.clone()))
                for ev, view, seen in in_flight[:-1]:  # copies complete one transfer late: until then, untouched
                    assert torch.equal(view, seen)
                    ev.done = True
                in_flight = in_flight[-1:]
                for i, k in enumerate(b["keys"]):
                    r = int(on_cpu["region_mask"][i].sum())
                    assert torch.equal(feats[i, :r], want.pop((epoch, k))[:r]), (epoch, k)
                batches += 1
                del b, feats, block, on_cpu
    assert not want and lent > 0
    assert not fake.events[-1].done and len(fake.events) == lent
    dm.teardown("fit")  # waits for the queued copies (the last one still running) and frees their buffers
    assert fake.synced >= 1 and all(e.done for e in fake.events) and not pinning._PENDING
    s = dm.buffer_stats()
    assert s["register"] and s["zero_copy_batches"] == lent and s["zero_copy_batches"] + s["fallback_batches"] == batches
    assert s["copy_path_batches"] == 0 and 0 < s["registered_buffers"] <= 2 * dl.dataset.ring_buffers
    assert len([c for c in fake.calls if c[0] == "register"]) == s["registered_buffers"]  # once per buffer
    del dl, dm, in_flight
    gc.collect()
    assert not fake.registered  # unregistered with the loader's ring, before its buffers were unmapped


def test_register_buffers_off_registers_nothing(shards, monkeypatch):
    from test_pinning import use_fake_cuda

    from value_pl.data import datamodule, pinning, resources

    root, collate = shards
    fake = use_fake_cuda(monkeypatch)
    monkeypatch.setattr(datamodule.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(resources, "available_cores", lambda: 64)
    dm = ShardDataModule(root, batch_size=4, num_workers=2, seed=0, pin_memory=True, register_buffers=False)
    dm.collate = collate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dl = dm.loader("train", train=True)
        assert dl.dataset.ring_buffers == dm.prefetch_factor + 2 and dl.dataset.ring_token not in pinning._WANT
        assert dm.loader("val", train=False).dataset.ring_buffers == 0
    assert dm.buffer_stats() is None  # not used yet
    assert not fake.calls
