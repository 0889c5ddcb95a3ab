"""Ring buffers page-locked with CUDA and lent to the host-to-device copy (value_pl.data.pinning), driven on the CPU
with fakes for cudaHostRegister/cudaHostUnregister and CUDA events: registered once per buffer, lent without a
copy, never reused by its worker before the copy reading it has completed, freed when dropped untransferred and at
teardown, unregistered before it is unmapped; a failed registration takes the copy path and says why."""
from __future__ import annotations

import gc
import logging
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from value_pl.data import handover, packing, pinning

META = torch.device("meta")  # a "device" the transfer copies to, on a CPU-only machine


class FakeEvent:
    def __init__(self, cuda: FakeCuda):
        self.cuda, self.done = cuda, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True
        self.cuda.synced += 1


class FakeCuda:
    """Records registrations (checking they are page-aligned, whole and never doubled) and hands out events that
    complete only when a test says so."""

    def __init__(self, fail: str | None = None):
        self.fail, self.registered, self.calls, self.events, self.synced = fail, {}, [], [], 0

    def register(self, ptr: int, size: int) -> str | None:
        self.calls.append(("register", ptr, size))
        if self.fail:
            return self.fail
        assert ptr % pinning.PAGE == 0 and size % pinning.PAGE == 0 and size > 0
        assert not any(p <= ptr < p + s or ptr <= p < ptr + size for p, s in self.registered.items())
        self.registered[ptr] = size
        return None

    def unregister(self, ptr: int) -> str | None:
        self.calls.append(("unregister", ptr))
        assert ptr in self.registered
        del self.registered[ptr]
        return None

    def event(self) -> FakeEvent:
        ev = FakeEvent(self)
        self.events.append(ev)
        return ev

    def covers(self, t: torch.Tensor) -> bool:
        a, b = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        return any(p <= a and b <= p + s for p, s in self.registered.items())


class Owner:  # what a ring token's lifetime follows (a ShardStream in a run)
    pass


def use_fake_cuda(monkeypatch) -> FakeCuda:
    """Fakes for this test's CUDA calls, and its own registrations, loans and queued copies (dropped after it)."""
    fake = FakeCuda()
    for name, v in (("CUDA", fake), ("_DISABLED", None), ("_REGISTERED", {}), ("_LENT", {}), ("_PENDING", [])):
        monkeypatch.setattr(pinning, name, v)
    return fake


@pytest.fixture
def cuda(monkeypatch):
    fake = use_fake_cuda(monkeypatch)
    copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, device=None: copies.append(1) or self.clone())
    fake.copies = copies  # the copy path's copies into (here: stand-in) pinned memory
    yield fake
    pinning.release()


def crossed(obj):
    return pickle.loads(ForkingPickler.dumps(obj))


def ring(register: bool, max_buffers: int = 2):
    owner = Owner()
    token = handover.new_token(owner, register=register)
    return owner, token, handover.Ring(token, max_buffers)


def send(r: handover.Ring, value: float, shape=(2, 3)):
    """A batch's features written by the worker and received by the main process."""
    t = r.tensor(shape, torch.float16)
    t.fill_(value)
    return t, crossed(r.ref(t))


def feats(p: packing.Packed) -> torch.Tensor:
    (t,) = p.tensors()
    return t


def as_batch(p: packing.Packed) -> dict:
    """A pinned ring batch that holds only its features, as the transfer receives it."""
    return {"region_feats": packing.Slot(0), packing.RING_KEY: p}


def flag(token, r, i) -> int:
    return int(handover._OPEN[token][(r.pid, i)][:8].view(torch.int64)[0])


def test_a_buffer_is_registered_once_and_lent_without_a_copy_until_its_copy_completes(cuda):
    owner, token, r = ring(True)
    a, fa = send(r, 1)
    buf0 = handover._OPEN[token][(r.pid, 0)]
    assert len(cuda.registered) == 1 and cuda.covers(buf0)  # the whole buffer, header included
    pinned = fa.pin_memory()
    assert pinned.block.data_ptr() == buf0.data_ptr() + handover._HEADER  # the buffer itself: no copy
    assert not cuda.copies and torch.equal(feats(pinned), torch.ones(2, 3, dtype=torch.float16))
    b, fb = send(r, 2)  # buffer 0 is lent: the worker takes buffer 1
    assert b.data_ptr() != a.data_ptr() and len(cuda.registered) == 2
    out = pinning.to_device({**as_batch(pinned), "ids": torch.arange(3)}, META)
    assert out["region_feats"].device == META and len(cuda.events) == 1  # one event: the lent tensor's copy
    assert pinning.to_device({}, META) == {} and flag(token, r, 0) == 1  # copy not done: still held
    c = r.tensor((2, 3), torch.float16)  # both held, at the cap: a one-off segment, never a lent buffer
    assert r.fallbacks == 1 and c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    del pinned, out
    gc.collect()
    assert flag(token, r, 0) == 1  # the view is gone but its copy may still read the buffer
    cuda.events[0].done = True
    pinning.to_device({}, META)  # the next transfer sees the copy done
    assert flag(token, r, 0) == 0
    d, fd = send(r, 3)
    assert d.data_ptr() == a.data_ptr()  # buffer 0 again, right after
    assert len(cuda.calls) == 2  # registered once, however many batches use it
    again = fd.pin_memory()
    assert again.block.data_ptr() == buf0.data_ptr() + handover._HEADER and float(feats(again)[0, 0]) == 3
    s = pinning.stats([token])
    assert (s["register"], s["registered_buffers"], s["zero_copy_batches"], s["copy_path_batches"]) == (True, 2, 2, 0)
    del again, fb
    gc.collect()
    del owner  # the ring's loader is gone: its buffers unregistered before they are unmapped
    gc.collect()
    assert not cuda.registered and token not in handover._OPEN
    assert pinning.stats([token])["unregistered_buffers"] == 2


def test_a_dropped_batch_frees_its_buffer(cuda):
    _owner, token, r = ring(True, max_buffers=1)
    _, fa = send(r, 1)
    del fa  # dropped before pinning (RingBatch.__del__)
    gc.collect()
    assert flag(token, r, 0) == 0
    _, fb = send(r, 2)
    view = fb.pin_memory()
    del fb
    gc.collect()
    assert flag(token, r, 0) == 1  # lent: the view still holds it
    del view  # never transferred (an exception, a loader shut down mid-epoch): nothing reads it
    gc.collect()
    assert flag(token, r, 0) == 0 and not cuda.events
    handover.forget(token)


def test_teardown_waits_for_queued_copies_then_frees_and_unregisters(cuda):
    _owner, token, r = ring(True)
    _, fa = send(r, 1)
    pinning.to_device(as_batch(fa.pin_memory()), META)
    held = handover._OPEN[token][(r.pid, 0)][:8].view(torch.int64)
    assert int(held[0]) == 1
    assert pinning.release({"another ring"}) == 0 and int(held[0]) == 1
    handover.forget(token)  # loader teardown: waits for the event, frees, unregisters
    assert cuda.synced == 1 and not cuda.registered and int(held[0]) == 0
    assert pinning.stats([token])["unregistered_buffers"] == 1


def test_a_retired_buffer_is_unregistered_once_free(cuda):
    _owner, token, r = ring(True, max_buffers=1)
    _, fa = send(r, 1, shape=(4,))
    old = handover._OPEN[token][(r.pid, 0)]
    old_ptr = next(iter(cuda.registered))
    pinning.to_device(as_batch(fa.pin_memory()), META)
    cuda.events[-1].done = True
    pinning.to_device({}, META)
    _, fb = send(r, 2, shape=(100_000,))  # too big for the free buffer at the cap: retired, a bigger one made
    assert ("unregister", old_ptr) in cuda.calls and handover._OPEN[token][(r.pid, 0)].data_ptr() != old.data_ptr()
    assert len(cuda.registered) == 1 and cuda.covers(handover._OPEN[token][(r.pid, 0)])
    assert torch.equal(feats(fb.pin_memory()), torch.full((100_000,), 2, dtype=torch.float16))
    handover.forget(token)
    assert not cuda.registered


def test_a_failed_registration_takes_the_copy_path_and_says_why(cuda, caplog):
    cuda.fail = "cudaHostRegister: out of memory (error 2)"
    _owner, token, r = ring(True)
    with caplog.at_level(logging.WARNING, logger=pinning.__name__):
        a, fa = send(r, 1)
        _, fb = send(r, 2)  # a second buffer: not tried again, not said again
    said = [m for m in caplog.messages if "register_buffers" in m]
    assert len(said) == 1 and "out of memory" in said[0] and "copied into pinned memory" in said[0]
    assert len(cuda.calls) == 1 and not cuda.registered
    got = fa.pin_memory()  # the copy path: copied out, the buffer freed at once
    assert cuda.copies and got.block.data_ptr() != a.data_ptr() and flag(token, r, 0) == 0
    assert torch.equal(feats(got), torch.ones(2, 3, dtype=torch.float16))
    fb.pin_memory()
    s = pinning.stats([token])
    assert s["register_error"] == cuda.fail and s["copy_path_batches"] == 2 and s["zero_copy_batches"] == 0
    handover.forget(token)


def test_switched_off_nothing_is_registered_and_pinning_copies(cuda):
    _owner, token, r = ring(False)
    a, fa = send(r, 1)
    got = fa.pin_memory()
    assert not cuda.calls and cuda.copies and got.block.data_ptr() != a.data_ptr() and flag(token, r, 0) == 0
    pinning.to_device(as_batch(got), META)
    assert not cuda.events
    s = pinning.stats([token])
    assert (s["register"], s["registered_buffers"], s["copy_path_batches"]) == (False, 0, 1)
    handover.forget(token)
    assert not cuda.calls


def test_more_buffers_per_worker_when_lent():
    assert [pinning.extra_buffers(w) for w in (1, 2, 3, 4, 8, 16)] == [4, 2, 2, 1, 1, 1]
    assert pinning.stats(["never used"]) is None


class FakeStream:
    def __init__(self, name: str):
        self.name, self.waited = name, []

    def wait_stream(self, other) -> None:
        self.waited.append(other)


def test_copies_on_a_side_stream_are_waited_for_and_marked_used_on_the_current_one(cuda, monkeypatch):
    """data.copy_stream: every copy (and a lent buffer's release event) is issued on the side stream; then the current
    stream waits for it, and each tensor made is recorded as used on the current stream (so the caching allocator
    does not give its memory back to the side stream while the step still reads it); the rest is left as it was."""
    import contextlib

    side, main = FakeStream("side"), FakeStream("main")
    current = [main]

    @contextlib.contextmanager
    def on(stream):
        before, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = before

    issued, recorded, events_on = [], [], []
    monkeypatch.setattr(pinning.torch.cuda, "stream", on)
    monkeypatch.setattr(pinning.torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: recorded.append((self, s)), raising=False)
    real_to, real_event = torch.Tensor.to, cuda.event
    copies = []  # what each copy made

    def to(self, *a, **k):
        issued.append(current[0])
        copies.append(real_to(self, *a, **k))
        return copies[-1]

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(cuda, "event", lambda: events_on.append(current[0]) or real_event())
    _owner, token, r = ring(True)
    _, fa = send(r, 1)
    already = torch.ones(2, device=META)
    batch = {**as_batch(fa.pin_memory()), "rows": {"region": torch.zeros(3)}, "keys": ["x"],
             "pair": (torch.ones(1), 5), "on_device": already}
    out = pinning.to_device(batch, META, side)
    assert issued == [side] * 3 and events_on == [side]  # the lent buffer's release follows its copy's stream
    assert main.waited == [side] and current == [main]
    made = [out["rows"]["region"], out["pair"][0]]
    assert [s for _, s in recorded] == [main] * 3 and [id(t) for t, _ in recorded] == [id(t) for t in copies]
    assert copies[0].dtype == torch.uint8 and all(any(t is c for c in copies) for t in made)  # the block's copy first
    assert all(t.device == META for t in made) and out["on_device"] is already  # not copied, not recorded
    assert out["keys"] == ["x"] and out["pair"][1] == 5
    handover.forget(token)


def test_the_module_copies_on_one_side_stream_per_cuda_device_only_while_asked(tmp_path, monkeypatch):
    from test_capture import tiny_uniter

    from value_pl.probers import module as module_py
    from value_pl.probers.module import ProbeModule

    m = ProbeModule(tiny_uniter(tmp_path), task={"name": "vrc", "kind": "region_region", "labels": ["a", "b"]},
                    prober={"name": "layer_emb"})
    made = []

    class CudaStream(FakeStream):  # (a class: torch.cuda.Stream also serves in annotations)
        def __init__(self, device=None):
            super().__init__(f"s{device}")
            made.append(device)

    monkeypatch.setattr(torch.cuda, "Stream", CudaStream)
    streams = m.copy_streams
    assert streams.enabled and streams.for_device(torch.device("cpu")) is None
    s0 = streams.for_device(torch.device("cuda", 0))
    assert streams.for_device(torch.device("cuda", 0)) is s0 and streams.for_device(torch.device("cuda", 1)) is not s0
    assert made == [0, 1]
    sent = []
    monkeypatch.setattr(module_py, "to_device", lambda batch, device, stream=None: sent.append(stream) or batch)
    m.transfer_batch_to_device({"x": torch.ones(1)}, torch.device("cuda", 1), 0)
    assert sent == [streams.for_device(torch.device("cuda", 1))]  # the module's copies go on that stream
    streams.enabled = False  # data.copy_stream=false
    assert streams.for_device(torch.device("cuda", 0)) is None


@pytest.mark.parametrize("override,on", [([], True), (["data.copy_stream=false", "data.pack_batches=false"], False)])
def test_data_copy_stream_and_pack_batches_reach_the_module_and_the_loader(tmp_path, override, on):
    from conftest import compose
    from test_cache import small_demo, tiny_backbone

    from value_pl.driver.setup import build_module, make_datamodule

    small_demo(tmp_path / "demo", splits={"train": 8, "val": 4, "test": 4})
    cfg = compose(["task=vrc", "prober=layer_emb", f"data.root={tmp_path / 'demo'}", *tiny_backbone(tmp_path),
                   "logger=none", *override])
    dm = make_datamodule(cfg)
    module, _ = build_module(cfg, dm)
    assert module.copy_streams.enabled is on
    assert dm.pack_batches is on and dm.loader("train", True).dataset.pack_batches is on
