"""Exact shard reading (value_pl.data.stream): any shard count with any ranks x workers, every sample once.

Shaped like the real splits: Flickr30k's val/test (1,000 images) are one shard at the default maxcount, so
multi-GPU evaluation reads fewer shards than ranks x workers; shard sizes are uneven (the last one short).
"""
from __future__ import annotations

import itertools
import tarfile

import pytest

from test_cache import small_demo
from value_pl.data.datamodule import ShardDataModule
from value_pl.data.schema import SchemaError, decode_sample
from value_pl.data.stream import ShardStream, pieces, rank_range, shard_order, slot_range
from value_pl.data.tar import count_samples, iter_samples


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven") / "demo"
    # train 7 shards (last has 2 samples), val 3 shards (5, 5, 3), test 3 shards (5, 5, 1)
    man = small_demo(root, splits={"train": 32, "val": 13, "test": 11}, maxcount=5)
    return root, man


def keys(stream, world, workers, epoch=0):
    """Sample keys read by every (rank, worker) of one epoch."""
    out = {}
    for r, w in itertools.product(range(world), range(workers)):
        s = ShardStream(stream.urls, stream.counts, decode_sample, list, stream.batch_size, stream.train,
                        seed=stream.seed, rank=r, world=world)
        out[(r, w)] = [x["key"] for x in s.samples(w, workers, epoch)]
    return out


def test_manifest_records_samples_per_shard(uneven):
    root, man = uneven
    e = man["splits"]["train"]
    assert e["shard_samples"] == [5, 5, 5, 5, 5, 5, 2] and sum(e["shard_samples"]) == e["samples"] == 32
    assert [count_samples(str(root / s)) for s in e["shards"]] == e["shard_samples"]
    assert e["max_words"] >= 8


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (3, 4), (8, 2)])
def test_eval_reads_every_sample_exactly_once(uneven, world, workers):
    root, man = uneven
    dm = ShardDataModule(root, eval_batch_size=2)
    for stage, n in (("val", 13), ("test", 11)):
        st = dm.stream(stage, train=False, collate=list)
        got = keys(st, world, workers)
        flat = [k for v in got.values() for k in v]
        assert len(flat) == n and len(set(flat)) == n, (stage, world, workers)
        # in order: rank by rank, worker by worker, the split's sample order (what a feature cache mirrors)
        assert flat == [x["key"] for x in ShardStream(st.urls, st.counts, decode_sample, list, 2, False,
                                                         rank=0, world=1).samples()]


@pytest.mark.parametrize("world,workers", [(1, 3), (2, 2), (4, 3)])
def test_a_training_epoch_is_an_epoch(uneven, world, workers):
    root, _ = uneven
    dm = ShardDataModule(root, batch_size=4, seed=5)
    st = dm.stream("train", train=True, collate=list)
    seen_all = set()
    for epoch in range(3):
        got = keys(st, world, workers, epoch)
        per_rank = [sum(len(got[(r, w)]) for w in range(workers)) for r in range(world)]
        flat = [k for v in got.values() for k in v]
        assert len(set(flat)) == len(flat) == 32 // world * world  # each sample at most once
        assert len(set(per_rank)) == 1  # equal per rank: equal batch counts, DDP does not hang
        seen_all |= set(flat)
    assert len(seen_all) == 32  # what one epoch leaves out (32 % world) is read in another
    # the epoch's shard order is the same on every rank and changes with the epoch
    assert shard_order(7, 5, 0, True) != shard_order(7, 5, 1, True)
    assert sorted(shard_order(7, 5, 1, True)) == list(range(7))


@pytest.mark.parametrize("world,workers,cap", [(2, 2, None), (3, 1, None), (2, 2, 1)])
def test_with_one_training_shard_every_sample_is_read_within_a_few_epochs(tmp_path, world, workers, cap):
    """One shard: the shard order cannot move what an epoch leaves over (13 % world samples, or all but
    world x train_batches batches); the epoch's seeded offset does, so no sample is left out every epoch."""
    root = tmp_path / "one"
    small_demo(root, splits={"train": 13, "val": 2, "test": 2}, maxcount=100)
    dm = ShardDataModule(root, batch_size=2, seed=3)
    st = dm.stream("train", train=True, collate=list)
    assert len(st.urls) == 1
    seen, left_out = set(), []
    for epoch in range(12):
        got = {}
        for r, w in itertools.product(range(world), range(workers)):
            s = ShardStream(st.urls, st.counts, decode_sample, list, 2, True, seed=3, rank=r, world=world,
                            cap_batches=cap)
            got[(r, w)] = [x["key"] for x in s.samples(w, workers, epoch)]
        per_rank = [sum(len(got[(r, w)]) for w in range(workers)) for r in range(world)]
        flat = [k for v in got.values() for k in v]
        assert len(set(flat)) == len(flat) and len(set(per_rank)) == 1  # disjoint, equal per rank
        assert per_rank[0] == (13 // world if cap is None else min(13 // world, 2 * cap))
        seen |= set(flat)
        left_out.append(13 - len(flat))
    assert len(seen) == 13 and max(left_out) > 0


def test_batches_per_rank_are_equal_and_at_most_one_is_partial(uneven):
    root, _ = uneven
    for world, workers, bs in [(2, 3, 4), (3, 2, 5), (1, 4, 3)]:
        nbs = []
        for r in range(world):
            sizes = []
            for w in range(workers):
                st = ShardStream([str(root / f"train-{i:06d}.tar") for i in range(7)], [5] * 6 + [2],
                                 decode_sample, lambda b: len(b), bs, True, rank=r, world=world)
                sr = slot_range(32, r, world, w, workers, bs, True)
                sizes += [min(bs, sr.stop - sr.start - i * bs) for i in range(sr.batches)]
            assert sum(sizes) == 32 // world and sum(1 for x in sizes if x < bs) <= 1
            nbs.append(len(sizes))
            assert len(st) == len(sizes)
        assert len(set(nbs)) == 1


def test_ranges_and_pieces():
    assert rank_range(10, 0, 3, train=False) == (0, 3) and rank_range(10, 2, 3, train=False) == (6, 10)
    assert rank_range(10, 2, 3, train=True) == (6, 9)
    # shard 2 (2 samples) first, then shard 0 (5), then shard 1 (5): global 3..8 = shard 0 [1, 5), shard 1 [0, 2)
    assert pieces([2, 0, 1], [5, 5, 2], 3, 9) == [(0, 1, 5), (1, 0, 2)]


def test_skipping_reads_no_bytes_and_matches_tarfile(uneven):
    root, man = uneven
    url = str(root / man["splits"]["test"]["shards"][0])
    with tarfile.open(url) as t:
        names = [m.name for m in t.getmembers()]
    got = list(iter_samples(url, 2, 4))
    assert [g["__key__"] for g in got] == [n.split(".")[0] for n in names[4:8:2]]
    assert [g["__index__"] for g in got] == [2, 3] and set(got[0]) >= {"json", "npy"}


def test_a_corrupt_shard_names_the_file(tmp_path, uneven):
    root, man = uneven
    src = (root / man["splits"]["val"]["shards"][0]).read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(src[:100] + b"x" * 10 + src[110:])
    with pytest.raises(SchemaError, match="bad.tar: corrupt tar header at byte 0"):
        list(iter_samples(str(bad)))
    bad.write_bytes(src[:512] + b"x" * 10 + src[522:])
    with pytest.raises(SchemaError, match="bad.tar: corrupt pax header at byte 0"):
        list(iter_samples(str(bad)))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src[:3000])
    with pytest.raises(SchemaError, match="cut.tar: truncated"):
        list(iter_samples(str(cut)))


def test_a_mapped_shard_gives_the_same_samples_and_the_same_errors(tmp_path, uneven):
    """``view=True`` (what a ShardStream reads with: ``mapped``) hands out read-only views of the mapped shard, with
    the bytes that reading gives; the views outlive the reader (and the file's name); a corrupt, truncated or empty
    shard reads as it does without the map."""
    import gc

    import numpy as np

    root, man = uneven
    url = str(root / man["splits"]["val"]["shards"][0])
    read, mapped = list(iter_samples(url)), list(iter_samples(url, view=True))
    assert [s["__key__"] for s in mapped] == [s["__key__"] for s in read] and len(read) == 5
    for a, b in zip(read, mapped):
        assert set(a) == set(b) and all(type(a[k]) is bytes and b[k] == a[k] for k in ("json", "npy"))
        assert isinstance(b["npy"], memoryview) and b["npy"].readonly
    copy = tmp_path / "copy.tar"
    copy.write_bytes((root / man["splits"]["val"]["shards"][0]).read_bytes())
    views = list(iter_samples(str(copy), 1, 3, view=True))
    copy.unlink()
    gc.collect()
    assert [decode_sample(v)["key"] for v in views] == [s["__key__"] for s in read[1:3]]
    assert all(np.array_equal(decode_sample(v)["feats"], decode_sample(r)["feats"]) for v, r in zip(views, read[1:3]))
    src = (root / man["splits"]["val"]["shards"][0]).read_bytes()
    for data, problem in ((src[:100] + b"x" * 10 + src[110:], "corrupt tar header at byte 0"),
                          (src[:512] + b"x" * 10 + src[522:], "corrupt pax header at byte 0"),
                          (src[:3000], "truncated")):
        bad = tmp_path / "bad.tar"
        bad.write_bytes(data)
        for view in (False, True):
            with pytest.raises(SchemaError, match=f"bad.tar: {problem}"):
                list(iter_samples(str(bad), view=view))
    (tmp_path / "empty.tar").write_bytes(b"")
    assert list(iter_samples(str(tmp_path / "empty.tar"), view=True)) == [] and count_samples(
        str(tmp_path / "empty.tar")) == 0


def test_a_stream_reads_the_same_batches_mapped_or_not(uneven):
    """``data.map_shards`` (default true) -> ``ShardStream.mapped``: the same batches either way."""
    root, man = uneven
    got = {}
    for mapped in (False, True):
        dm = ShardDataModule(root, batch_size=4, shuffle_buffer=8, seed=3, map_shards=mapped)
        st = dm.stream("train", True, collate=list)
        assert st.mapped is mapped and ShardDataModule(root).stream("val", False, collate=list).mapped
        got[mapped] = [[(s["key"], s["meta"], s["feats"].tobytes()) for s in b] for b in st.batches(0, 1, 1)]
    assert got[True] == got[False] and sum(map(len, got[True])) == 32


def test_manifest_counts_that_lie_are_an_error(uneven):
    root, man = uneven
    st = ShardDataModule(root).stream("val", train=False, collate=list)
    st.counts = [5, 5, 4]  # the manifest claims one more sample than the last shard holds
    st.total = 14
    with pytest.raises(SchemaError, match="rebuild"):
        list(st.samples())


# ------------------------------------------------------------------ bad features: an error naming shard and sample
def rewrite_first_npy(src, dst, change):
    """Copy shard ``src`` to ``dst`` with the first sample's ``.npy`` replaced by ``change(array)``; -> its key."""
    import io

    import numpy as np

    with tarfile.open(src) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    key = None
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as t:
        for m, data in members:
            if key is None and m.name.endswith(".npy"):
                key = m.name[:-4]
                buf = io.BytesIO()
                np.save(buf, change(np.load(io.BytesIO(data))))
                data = buf.getvalue()
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    return key


@pytest.mark.parametrize("change,problem", [
    (lambda a: a[:1], r"1 feature row\(s\) for \d+ box\(es\)"),  # was silently broadcast into every region
    (lambda a: a[:2], r"2 feature row\(s\) for \d+ box\(es\)"),  # was a bare numpy broadcast error
    (lambda a: a[:, :1], r"features of width 1, but manifest.json says feature_dim=\d+"),  # was broadcast
    (lambda a: a[:, :-1], r"features of width \d+, but manifest.json says feature_dim=\d+"),
    (lambda a: a.astype("float32"), "features must be float16, got float32"),  # was cast silently
    (lambda a: a.reshape(-1), r"features must be a 2-d array"),
])
def test_features_that_do_not_fit_the_boxes_name_the_shard_and_sample(tmp_path, uneven, change, problem):
    import shutil

    root, man = uneven
    bad = tmp_path / "demo"
    shutil.copytree(root, bad)
    shard = man["splits"]["val"]["shards"][0]
    key = rewrite_first_npy(root / shard, bad / shard, change)
    dm = ShardDataModule(bad, eval_batch_size=4)
    with pytest.raises(SchemaError, match=rf"{shard}: sample {key}: {problem}"):
        list(dm.stream("val", train=False, collate=list).samples())


def test_the_collator_never_broadcasts_features(tmp_path, uneven):
    """Without a known feature_dim (an old manifest, decode_sample called alone) a width-1 sample still stops at the
    collator, naming it, instead of being broadcast over the batch's feature width."""
    from value_pl.backbones.common import load_tokenizer, minilm_path
    from value_pl.data.collate import Collator, InputEncoder

    root, man = uneven
    shard = man["splits"]["val"]["shards"][0]
    key = rewrite_first_npy(root / shard, tmp_path / shard, lambda a: a[:, :1])
    st = ShardStream([str(tmp_path / shard)], [5], decode_sample, list, 5, False)  # feature_dim unknown
    samples = list(st.samples())
    assert samples[0]["key"] == key and samples[0]["feats"].shape[1] == 1
    collate = Collator(InputEncoder(load_tokenizer(minilm_path()), "uniter7", 64))
    with pytest.raises(SchemaError, match=rf"{shard}: sample {key}: features of shape \(\d+, 1\)"):
        collate(samples)
    collate(samples[1:])  # the others are fine


# --------------------------------------------------------------- corrupt pax headers: an error, never a hang
def _pax_tar(path, size_value=None):
    """A 2-sample pax tar; ``size_value``: the first member's pax ``size`` record (its true size is 10000)."""
    import io

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for k in ("a", "b"):
            for ext in ("json", "npy"):
                data = b"x" * (10000 if size_value and k == "a" and ext == "json" else 10)
                ti = tarfile.TarInfo(f"{k}.{ext}")
                ti.size, ti.pax_headers = len(data), {"comment": "hello"}
                if size_value and k == "a" and ext == "json":
                    ti.pax_headers = {"comment": "hello", "size": str(len(data))}
                t.addfile(ti, io.BytesIO(data))
    raw = bytearray(path.read_bytes())
    if size_value:
        i = raw.index(b"size=10000\n") + 5
        raw[i:i + 5] = size_value
    return raw


def _read_in_child(fn, arg, q):
    try:
        q.put(("ok", repr(fn(arg))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((type(e).__name__, str(e)))


def read_or_hang(fn, arg, timeout=30.0):
    """``fn(arg)`` in a forked child: ('ok', repr) or (exception type, message); a child still reading after
    ``timeout`` seconds is killed and the test fails (the bug was an endless loop)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(fn, str(arg) if not isinstance(arg, bytes) else arg, q), daemon=True)
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"{fn.__name__}({arg!r}) still running after {timeout} s (endless loop)")
    return q.get(timeout=5)


def _all_samples(path):
    return [s["__key__"] for s in iter_samples(path)]


@pytest.mark.parametrize("length,problem", [
    (b"00", "declares length 0"),    # was an endless loop (i += 0)
    (b"03", "declares length 3"),    # no room for key=value after its own length field
    (b"99", "declares length 99"),   # past the header data: was read as one record, silently
    (b"1x", "no decimal length"),
    (b" 0", "no decimal length"),
])
def test_a_corrupt_pax_record_length_is_an_error_not_a_hang(tmp_path, length, problem):
    raw = _pax_tar(tmp_path / "ok.tar")
    assert read_or_hang(count_samples, tmp_path / "ok.tar") == ("ok", "2")
    i = raw.index(b" comment=hello\n")  # "17 comment=hello\n": replace the length digits
    assert raw[i - 2:i] == b"17"
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw[:i - 2] + length + raw[i:]))
    for fn in (count_samples, _all_samples):
        kind, msg = read_or_hang(fn, bad)
        assert kind == "SchemaError", (fn.__name__, kind, msg)
        assert f"{bad}: corrupt pax header at byte 0" in msg and problem in msg, msg


def test_a_pax_record_of_length_zero_at_the_start():
    """The smallest endless loops: header data ``b"0 ..."`` (length 0 at byte 0), in a child process."""
    from value_pl.data.tar import _pax

    for data in (b"0 \n", b"00 path=x\n", b"10 path=x\n0 size=42\n"):
        kind, msg = read_or_hang(_pax, data, timeout=10.0)
        assert kind == "ValueError" and "declares length 0" in msg, (data, kind, msg)
    assert _pax(b"10 path=x\n11 size=42\n") == {"path": "x", "size": "42"}


@pytest.mark.parametrize("value,problem", [
    (b"1000Z", "size='1000Z' is not a byte count"),  # was a bare ValueError naming no file
    (b"-1600", "size='-1600' is not a byte count"),  # seeks back onto the pax header: was an endless loop
    (b"99999", "truncated tar member at byte 1024 (99999 bytes declared)"),
])
def test_a_bad_pax_size_names_the_file(tmp_path, value, problem):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(_pax_tar(bad, value)))
    for fn in (count_samples, _all_samples):
        kind, msg = read_or_hang(fn, bad)
        assert kind == "SchemaError" and msg.startswith(f"{bad}: ") and problem in msg, (fn.__name__, kind, msg)


def test_a_split_too_small_for_the_processes_is_a_clear_error(uneven, monkeypatch):
    """A rank with no batch (fewer samples than processes) stopped every rank with Lightning's bare "zero length"
    error: the loader names the split, its samples and the process count."""
    from value_pl.data import stream

    root, man = uneven
    monkeypatch.setattr(stream, "_dist", lambda: (1, 12))  # rank 1 of 12 processes; val has 13 samples, test 11
    dm = ShardDataModule(root, batch_size=4)
    dm.collate = list
    assert len(dm.loader("val", False)) == 1
    monkeypatch.setattr(stream, "_dist", lambda: (0, 12))  # 11 samples over 12 ranks: rank 0 reads [0, 0)
    with pytest.raises(ValueError, match=r"split test has 11 sample\(s\), too few for 12 processes \(rank 0 gets "
                                         r"none\); run it with fewer processes"):
        dm.loader("test", False)
