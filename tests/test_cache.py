"""Feature cache: cached training == online training for the same seed; mismatching caches are refused."""
import json
import math

import pytest
import torch

from conftest import compose


def tiny_backbone(tmp_path) -> list[str]:
    """A random 2-layer, 32-d UNITER with the MiniLM tokenizer (fast on CPU)."""
    cfg = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2}
    p = tmp_path / "tiny_uniter.json"
    p.write_text(json.dumps(cfg))
    return ["backbone.pretrained=false", f"backbone.config={p}", "backbone.tokenizer=minilm"]


def small_demo(root, splits=None, maxcount=None):
    from value_pl.datasets import demo

    return demo.build_demo(root, splits=splits or {"train": 48, "val": 16, "test": 16},
                           maxcount=maxcount or demo.MAXCOUNT)


FAST = ["logger=none", "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "data.train_batches=3",
        "data.batch_size=8", "data.eval_batch_size=8"]


def heads_of(ckpt):
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith("heads.")}


@pytest.mark.slow
def test_cached_training_equals_online(tmp_path):
    from value_pl.data.cache import unpack_cached
    from value_pl.driver.extract import extract_cache
    from value_pl.driver.setup import build_module, make_datamodule
    from value_pl.driver.train import train

    root = tmp_path / "demo"
    small_demo(root)
    common = ["prober=attention", "task=vrc", f"data.root={root}", *tiny_backbone(tmp_path), *FAST]
    online = train(compose(common + [f"run_dir={tmp_path / 'online'}"]))

    cache = tmp_path / "cache32"
    man = extract_cache(compose(common + [f"cache.root={cache}", "cache.dtype=float32",
                                          f"run_dir={tmp_path / 'x'}"], config_name="extract"))
    assert man["splits"]["train"]["samples"] == 48 and man["cache"]["dtype"] == "float32"
    assert all(p.suffix in (".tar", ".json") for p in cache.iterdir())
    cached = train(compose(common + [f"data.cache={cache}", f"run_dir={tmp_path / 'cached'}"]))

    a = heads_of(tmp_path / "online" / "checkpoints" / "last.ckpt")
    b = heads_of(tmp_path / "cached" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert [r["test_acc"] for r in online["layers"]] == pytest.approx([r["test_acc"] for r in cached["layers"]])
    assert online["pairs_evaluated"] == cached["pairs_evaluated"]
    assert cached["pairs_evaluated"]["test"] == sum(man["splits"]["test"]["pairs"]["vrc"].values())

    # fp16 cache: same features within fp16 rounding, half the bytes
    c16 = tmp_path / "cache16"
    extract_cache(compose(common + [f"cache.root={c16}", "cache.splits=[val]", f"run_dir={tmp_path / 'y'}"],
                          config_name="extract"))
    cfg32 = compose(common + [f"data.cache={cache}"])
    cfg16 = compose(common + [f"data.cache={c16}"])
    dm32, dm16 = make_datamodule(cfg32), make_datamodule(cfg16)
    m32, _ = build_module(cfg32, dm32)
    build_module(cfg16, dm16)
    b32 = next(iter(dm32.val_dataloader()))
    b16 = next(iter(dm16.val_dataloader()))
    assert torch.equal(b32["labels"], b16["labels"])
    # each batch crosses as one tensor of the cache's dtype (one shared segment from a loader worker)
    assert b32["cached_flat"].dtype == torch.float32 and b16["cached_flat"].dtype == torch.float16
    f32, f16 = unpack_cached(b32), unpack_cached(b16)
    for k in m32.head_names:
        for x, y in zip(f32[k], f16[k]):
            assert x.dtype == y.dtype == torch.float32
            torch.testing.assert_close(x, y, atol=2e-3, rtol=2e-3)

    # a cache for another backbone / task / layers is refused with a clear error
    for bad in (["backbone.seed=1"], ["task=vri"], ["prober=layer_emb"]):
        cfg = compose(common + [f"data.cache={cache}"] + bad)
        with pytest.raises(ValueError, match="does not match this run"):
            build_module(cfg, make_datamodule(cfg))
    # ... or for other inputs to the same weights: texts cut elsewhere, other regions kept
    for bad, what in ((["backbone.max_regions=2"], "max_regions=100 in the cache != 2"),
                      (["backbone.max_text_len=8"], "text_limit=128 in the cache != 8")):
        cfg = compose(common + [f"data.cache={cache}"] + bad)
        with pytest.raises(ValueError, match=what):
            build_module(cfg, make_datamodule(cfg))
    # a cache written before the identity held those is refused, naming why
    import json as _json

    mpath = cache / "manifest.json"
    man_old = _json.loads(mpath.read_text())
    mpath.write_text(_json.dumps({**man_old, "version": 2}))
    cfg = compose(common + [f"data.cache={cache}"])
    with pytest.raises(ValueError, match="version 2, older .* Re-extract"):
        build_module(cfg, make_datamodule(cfg))
    mpath.write_text(_json.dumps(man_old))
    # a subset of the cached layers is fine
    cfg = compose(common + [f"data.cache={cache}", "layers=[1]"])
    build_module(cfg, make_datamodule(cfg))


# ------------------------------------------------- damaged cache records: errors name the shard, record and member
def _cache_record(key="img_7", pairs=3, dim=4):
    import numpy as np

    from value_pl.data.cache import _npy

    rng = np.random.default_rng(0)
    return {"__key__": key, "labels.npy": _npy(np.arange(pairs, dtype=np.int64)),
            "h000_0.npy": _npy(rng.standard_normal((pairs, dim)).astype(np.float16)),
            "h000_1.npy": _npy(rng.standard_normal((pairs, dim)).astype(np.float16)),
            "info.json": json.dumps({"counts": {"pairs_dropped": 1}}).encode()}


@pytest.mark.parametrize("member", ["labels.npy", "h000_0.npy", "info.json"])
def test_a_damaged_cache_record_names_the_file_record_and_member(tmp_path, member):
    import io
    import tarfile

    from value_pl.data.cache import decode_record
    from value_pl.data.schema import SchemaError
    from value_pl.data.tar import iter_samples

    rec = _cache_record()
    url = tmp_path / "val-000000.tar"
    with tarfile.open(url, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in rec.items():
            if name.startswith("__"):
                continue
            if name == member:
                data = data[:-7]  # a damaged record (the bytes of an interrupted copy)
            ti = tarfile.TarInfo(f"{rec['__key__']}.{name}")
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    (raw,) = iter_samples(str(url))
    with pytest.raises(SchemaError, match=rf"^{url}: cache record img_7: {member}: "):
        decode_record(raw)


def test_cache_collate_names_a_missing_or_misshapen_input():
    import numpy as np

    from value_pl.data.cache import CacheCollate, decode_record
    from value_pl.data.schema import SchemaError

    col = CacheCollate(["emb:0"], {"emb:0": [[4], [4]]}, ["emb:0"])
    good = decode_record({**_cache_record("a"), "__url__": "c/train-000001.tar"})
    good["source"] = ("c/train-000001.tar", 0)  # what ShardStream adds to a decoded record
    out = col([good])
    assert out["cached_layout"] == [("emb:0", 0, 0, (3, 4)), ("emb:0", 1, 12, (3, 4))]
    missing = decode_record({k: v for k, v in _cache_record("b").items() if k != "h000_1.npy"})
    missing["source"] = ("c/train-000001.tar", 1)
    with pytest.raises(SchemaError, match=r"^c/train-000001.tar: cache record b: h000_1.npy: missing"):
        col([good, missing])
    short = decode_record(_cache_record("c"))
    short["source"] = ("c/train-000001.tar", 2)
    short["inputs"][(0, 0)] = np.zeros((2, 4), np.float16)  # 2 rows for 3 pair labels
    with pytest.raises(SchemaError, match=r"^c/train-000001.tar: cache record c: h000_0.npy: shape \(2, 4\), "
                                          r"expected \(3, 4\)"):
        col([good, short])


# --------------------------------------- what a cache must match, and what cached batches count (small, no training)
CTL = ["task=vcd", "backbone.max_text_len=8", "backbone.max_regions=4", "control=true", "control_seed=3",
       "data.batch_size=3", "data.eval_batch_size=8", "progress=false", "logger=none"]


@pytest.fixture(scope="module")
def control_cache(tmp_path_factory):
    """A train-split cache of a control task whose texts and regions are cut (pairs dropped, texts truncated)."""
    from value_pl.driver.extract import extract_cache

    tmp = tmp_path_factory.mktemp("ctl")
    root = tmp / "demo"
    small_demo(root, splits={"train": 24, "val": 8, "test": 8})
    common = ["prober=attention", f"data.root={root}", *tiny_backbone(tmp), *CTL]
    extract_cache(compose(common + [f"cache.root={tmp / 'cache'}", "cache.splits=[train]",
                                    f"run_dir={tmp / 'x'}"], config_name="extract"))
    return tmp, root, common


def test_cached_batches_count_and_label_what_online_batches_do(control_cache):
    """Batches of another size than extraction's (and a shuffled order) carry the same counters and control labels
    as the online batches of the same samples: each record keeps its own share of the collator's counters."""
    from value_pl.driver.setup import build_module, make_datamodule

    tmp, _, common = control_cache
    seen = []
    for extra in ([], [f"data.cache={tmp / 'cache'}"]):
        cfg = compose(common + extra)
        dm = make_datamodule(cfg)
        build_module(cfg, dm)
        seen.append([(b["keys"], b["labels"].tolist(), b["counts"]) for b in dm.loader("train", True)])
    online, cached = seen
    assert len(online) == 8 and online == cached
    assert sum(c["pairs_dropped"] for _, _, c in online) > 0 and sum(c["texts_truncated"] for _, _, c in online) > 0


def test_a_cache_is_refused_for_another_tokenizer_control_seed_or_rebuilt_shards(control_cache, tmp_path):
    """Same weights (checksum) but other token ids, another control task, another precision, or shards rebuilt where
    the cache was extracted from: refused, naming why. Another prober seed with the same control_seed reads the same
    labels."""
    from helpers_backbones import tiny_tokenizer

    from value_pl.driver.setup import build_module, make_datamodule

    tmp, root, common = control_cache
    cached = common + [f"data.cache={tmp / 'cache'}"]
    cfg = compose(cached + ["seed=5"])
    build_module(cfg, make_datamodule(cfg))
    tok = tiny_tokenizer(tmp_path / "tok")  # same ids range, other vocabulary: same checksum, other features
    for bad, what in (([f"backbone.tokenizer={tok}"], r"backbone tokenizer=\w+ in the cache != \w+ configured"),
                      (["control_seed=4"], "label_seed=3 != 4"),
                      # the online step would run the frozen forward under bf16 autocast: other features
                      (["trainer.precision=bf16-mixed"], r"precision 32 in the cache != bf16-mixed configured")):
        cfg = compose(cached + bad)
        with pytest.raises(ValueError, match=what):
            build_module(cfg, make_datamodule(cfg))
    man = root / "manifest.json"
    saved = man.read_text()
    try:
        man.write_text(saved.replace('"seed"', '"seed" ', 1))  # the shards rebuilt in place
        cfg = compose(cached)
        with pytest.raises(ValueError, match=f"the shards at data.root={root} changed since the cache was extracted"):
            build_module(cfg, make_datamodule(cfg))
    finally:
        man.write_text(saved)


@pytest.mark.parametrize("scale", [1e5, float("nan")])
def test_extraction_refuses_inputs_the_cache_dtype_cannot_hold(control_cache, tmp_path, scale):
    """Hidden states beyond float16's 65504 would be stored as inf (NaN losses in every cached run): refused with
    the fix (cache.dtype=float32, which holds them); non-finite backbone outputs are refused in any dtype."""
    from torch import nn

    from value_pl.driver.extract import write_split
    from value_pl.driver.setup import build_module, make_datamodule

    _, _, common = control_cache
    cfg = compose(common + ["prober=layer_emb", "layers=[2]"])
    dm = make_datamodule(cfg)
    module, _ = build_module(cfg, dm)
    with torch.no_grad():
        for m in module.backbone.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.mul_(scale)
    if math.isnan(scale):
        with pytest.raises(ValueError, match="head emb:layer_02 input 0 holds non-finite values"):
            write_split(module, dm, "val", tmp_path, "float32")
        return
    with pytest.raises(ValueError, match=r"emb:layer_02 input 0 holds values up to .* beyond float16's 65504 .* "
                                         r"cache.dtype=float32"):
        write_split(module, dm, "val", tmp_path, "float16")
    entry, _ = write_split(module, dm, "val", tmp_path, "float32")
    assert entry["samples"] == 8


def test_mdl_and_senteval_read_a_cache_like_the_shards(control_cache):
    """``extract_split`` (MDL's and SentEval's one pass over a split) on a cache gives the online features (within
    the fp16 cache's rounding), labels and counters; it used to run the backbone on the cached batch (KeyError)."""
    from value_pl.driver.setup import build_module, make_datamodule
    from value_pl.protocols.fitting import extract_split

    tmp, _, common = control_cache
    out = []
    for extra in ([], [f"data.cache={tmp / 'cache'}"]):
        cfg = compose(common + extra)
        dm = make_datamodule(cfg)
        module, _ = build_module(cfg, dm)
        out.append(extract_split(module, dm, "train"))
    (f_on, y_on, c_on), (f_ca, y_ca, c_ca) = out
    assert torch.equal(y_on, y_ca) and c_on == c_ca and c_on["pairs_dropped"] > 0
    assert f_on.keys() == f_ca.keys() and f_on
    for k in f_on:
        for a, b in zip(f_on[k], f_ca[k]):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_a_bf16_cache_is_extracted_as_the_online_step_computes_and_read_only_by_bf16_runs(control_cache, tmp_path):
    """``trainer.precision=bf16-mixed`` runs the online step under bf16 autocast on any device (Lightning's CPU
    autocast too): extraction does the same and records it, and a float32 run refuses that cache."""
    from value_pl.driver.extract import extract_cache
    from value_pl.driver.setup import build_module, make_datamodule

    tmp, _, common = control_cache
    bf16 = ["trainer.precision=bf16-mixed"]
    man = extract_cache(compose(common + bf16 + [f"cache.root={tmp_path / 'cache'}", "cache.splits=[train]",
                                                 f"run_dir={tmp_path / 'x'}"], config_name="extract"))
    assert man["cache"]["precision"] == "bf16-mixed"
    cfg = compose(common + bf16 + [f"data.cache={tmp_path / 'cache'}"])
    build_module(cfg, make_datamodule(cfg))
    cfg = compose(common + [f"data.cache={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match=r"precision bf16-mixed in the cache != 32 configured"):
        build_module(cfg, make_datamodule(cfg))
