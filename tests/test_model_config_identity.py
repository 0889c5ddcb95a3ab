"""A backbone's effective model config is part of its identity: the same weights under another ``layer_norm_eps``,
activation, head count or attention implementation compute other features, so a feature cache, a prober checkpoint
or a ``compare`` cache row made under one config is not reused under another (refused naming the fields, or
measured again)."""
import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import compose

TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2}
#: same parameter shapes and seeded init as TINY (same weights checksum), other computation
OTHER = {**TINY, "layer_norm_eps": 1e-5, "hidden_act": "relu", "num_attention_heads": 4}
FAST = ["task=vcd", "prober=layer_emb", "layers=[1]", "backbone.max_text_len=8", "backbone.max_regions=4",
        "data.batch_size=4", "data.eval_batch_size=8", "progress=false", "logger=none"]


def _configs(d: Path) -> tuple[str, str]:
    a, b = d / "tiny.json", d / "other.json"
    a.write_text(json.dumps(TINY))
    b.write_text(json.dumps({**OTHER, "_name_or_path": "/elsewhere", "transformers_version": "0.0",
                             "architectures": ["BertForPreTraining"], "hidden_dropout_prob": 0.3}))
    return str(a), str(b)


def _backbone(config: str) -> list[str]:
    return ["backbone.pretrained=false", f"backbone.config={config}", "backbone.tokenizer=minilm"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from value_pl.datasets import demo

    tmp = tmp_path_factory.mktemp("cfgid")
    demo.build_demo(tmp / "demo", splits={"train": 8, "val": 4, "test": 4}, maxcount=demo.MAXCOUNT)
    return tmp, tmp / "demo", _configs(tmp)


def test_the_record_leaves_out_only_what_cannot_change_outputs(shards):
    """Bookkeeping, dropout and initialisation fields do not enter the record; the fields that change the layers'
    arithmetic, the attention implementation and the weights' dtype do."""
    from omegaconf import OmegaConf

    from value_pl.backbones import build_backbone

    _, _, (tiny, other) = shards
    a = build_backbone(OmegaConf.create({"family": "uniter", "config": tiny, "tokenizer": "minilm", "img_dim": 16,
                                         "pretrained": False}))
    b = build_backbone(OmegaConf.create({"family": "uniter", "config": other, "tokenizer": "minilm", "img_dim": 16,
                                         "pretrained": False}))
    assert a.describe()["checksum"] == b.describe()["checksum"]  # same weights ...
    assert a.describe()["config_sha256"] != b.describe()["config_sha256"]  # ... another model
    rec = a.config_record
    assert rec["attn_implementation"] == "sdpa" and rec["weights_dtype"] == ["float32"] and rec["img_dim"] == 16
    for gone in ("_name_or_path", "transformers_version", "architectures", "dtype", "hidden_dropout_prob",
                 "initializer_range", "id2label"):
        assert gone not in rec
    diff, odd = a.config_differences(b.config_record, "other")
    assert [d.split("=")[0] for d in diff] == ["hidden_act", "layer_norm_eps", "num_attention_heads"] and not odd
    # a field only one side has (another transformers version added it): said, not a difference
    diff, odd = a.config_differences({**a.config_record, "new_field": 1})
    assert diff == [] and odd == ["new_field"]


def test_a_feature_cache_is_refused_for_another_model_config(shards, caplog):
    """Extracted with one config, read with another whose weights checksum is the same: refused, naming the fields
    (it used to be accepted: only the checksum, tokenizer and input limits were compared)."""
    from value_pl.driver.extract import extract_cache
    from value_pl.driver.setup import build_module, make_datamodule

    tmp, root, (tiny, other) = shards
    common = [f"data.root={root}", *FAST]
    man = extract_cache(compose(common + _backbone(tiny) + [f"cache.root={tmp / 'cache'}", "cache.splits=[val]",
                                                           f"run_dir={tmp / 'x'}"], config_name="extract"))
    assert man["version"] == 5 and man["cache"]["backbone"]["config"]["layer_norm_eps"] == 1e-12
    cached = common + [f"data.cache={tmp / 'cache'}"]
    cfg = compose(cached + _backbone(tiny))
    build_module(cfg, make_datamodule(cfg))  # the same config: accepted
    cfg = compose(cached + _backbone(other))
    with pytest.raises(ValueError, match=r"model config \w+ in the cache != \w+ configured: hidden_act='gelu' \(cache\) "
                                         r"!= 'relu' \(configured\); layer_norm_eps=1e-12 \(cache\) != 1e-05 "
                                         r"\(configured\); num_attention_heads=2 \(cache\) != 4 \(configured\)"):
        build_module(cfg, make_datamodule(cfg))
    # an untrained twin drawn with another seed: other weights, and the refusal says which field made them
    cfg = compose(cached + _backbone(tiny) + ["backbone.seed=1"])
    with pytest.raises(ValueError, match=r"checksum \w+ \(seed=0 \(cache\) != 1 \(configured\)\)"):
        build_module(cfg, make_datamodule(cfg))
    mpath = tmp / "cache" / "manifest.json"
    m = json.loads(mpath.read_text())
    # a field only the cache's record has (written under a transformers that had it): said, not refused
    bb = m["cache"]["backbone"]
    other_lib = {**m, "cache": {**m["cache"], "backbone": {**bb, "config": {**bb["config"], "new_field": 1},
                                                           "config_sha256": "0" * 16}}}
    mpath.write_text(json.dumps(other_lib))
    try:
        cfg = compose(cached + _backbone(tiny))
        with caplog.at_level(logging.WARNING, logger="value_pl"):
            build_module(cfg, make_datamodule(cfg))
        assert any("['new_field'] recorded on one side only" in r.getMessage() for r in caplog.records)
    finally:
        mpath.write_text(json.dumps(m))
    # a version-4 cache (no model config recorded) cannot be checked: refused, asking for a re-extraction
    mpath.write_text(json.dumps({**m, "version": 4}))
    try:
        cfg = compose(cached + _backbone(tiny))
        with pytest.raises(ValueError, match="version 4, older .* model config"):
            build_module(cfg, make_datamodule(cfg))
    finally:
        mpath.write_text(json.dumps(m))


def test_a_prober_checkpoint_is_refused_for_another_model_config(shards):
    """A prober checkpoint keeps its backbone's model config; loading it against a backbone with the same weights
    but another config is refused, naming the field (it used to load: only the checksum was compared)."""
    from value_pl.driver.setup import build_module, make_datamodule

    _, root, (tiny, other) = shards
    mods = []
    for config in (tiny, other):
        cfg = compose([f"data.root={root}", *FAST, *_backbone(config)])
        mods.append(build_module(cfg, make_datamodule(cfg))[0])
    ck = {"state_dict": {}}
    mods[0].on_save_checkpoint(ck)
    saved = torch.load(_roundtrip(ck, Path(root).parent / "probe.ckpt"), weights_only=True)  # loads without pickle
    assert saved["value_pl"]["backbone_config"]["layer_norm_eps"] == 1e-12
    mods[0].on_load_checkpoint(saved)  # its own backbone: accepted
    with pytest.raises(ValueError, match=r"configured otherwise .*layer_norm_eps=1e-12 \(checkpoint\) != 1e-05 \(now\)"):
        mods[1].on_load_checkpoint(saved)


def _roundtrip(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_compare_measures_again_under_another_model_config(shards, monkeypatch):
    """The compare cache key holds the model config the backbone is built with, as transformers reads it: a
    config file that leaves ``layer_norm_eps`` to the library's default, read where the default is another (a
    transformers upgrade), is measured again instead of served from the cache made under the old default."""
    from omegaconf import OmegaConf

    import value_pl.backbones.uniter as U
    import value_pl.compare.driver as D
    from value_pl.backbones import build_backbone
    from value_pl.compare import compare

    tmp, root, (tiny, _) = shards
    d = tmp / "ck"
    d.mkdir()
    bb = build_backbone(OmegaConf.create({"family": "uniter", "config": tiny, "tokenizer": "minilm", "img_dim": 64,
                                          "pretrained": False, "seed": 1}))
    torch.save(dict(bb.state_dict()), d / "step_10.pt")
    seen = []
    monkeypatch.setattr(D, "run_suite", lambda backbone, suite, data: seen.append(
        backbone.config.layer_norm_eps) or {"metrics": {"w": 1.0}, "skipped": {}, "forwards": 0, "seconds": 0.0})
    common = [f"checkpoints={d}/*.pt", "backbone=uniter", f"backbone.config={tiny}", "backbone.tokenizer=minilm",
              "backbone.img_dim=64", f"data.root={root}", f"out={tmp}/run", "logger=none", "plots=false",
              "progress=false"]
    assert compare(compose(common, "compare"))["built"] == 1
    assert compare(compose(common, "compare"))["built"] == 0  # same everything: cached
    real = U._bert_config

    def other_default(path, config):
        c = real(path, config)
        c.layer_norm_eps = 1e-5  # what another transformers would fill in for the field the file leaves out
        return c

    monkeypatch.setattr(U, "_bert_config", other_default)
    res = compare(compose(common, "compare"))
    assert res["built"] == 1 and seen == [1e-12, 1e-5]
    assert res["rows"][0]["config_sha256"] == build_backbone(OmegaConf.create(
        {"family": "uniter", "config": tiny, "tokenizer": "minilm", "img_dim": 64, "pretrained": False})
    ).describe()["config_sha256"]


def test_the_report_refuses_to_average_seeds_of_one_backbone_under_other_model_configs(shards):
    """results.json records the backbone's model config (``config_sha256`` and the record, ``model_config``): the
    report refuses to average two seeds of the same weights built with another ``layer_norm_eps`` / activation /
    head count, naming both files and the fields (it used to average them: only the weights were compared). Results
    written before the record (no ``config_sha256``) are not refused but named under each table (config unknown)."""
    from value_pl import report
    from value_pl.data.hashing import canonical_sha256
    from value_pl.driver.results import results_dict, write_results
    from value_pl.driver.setup import build_module, make_datamodule

    tmp, root, (tiny, other) = shards
    files = {}
    for seed, (name, config) in enumerate([("a", tiny), ("b", tiny), ("c", other)]):
        cfg = compose([f"data.root={root}", *FAST, *_backbone(config), f"seed={seed}"])
        dm = make_datamodule(cfg)
        module = build_module(cfg, dm)[0]
        res = results_dict(cfg, module, dm, rows=[{"layer": 1, "name": "layer_01", "val_acc": 0.6 + seed / 10,
                                                   "test_acc": 0.6 + seed / 10}],
                           counts={"test": None}, label_counts={"train": [3, 1], "test": [1, 1]})
        b = res["backbone"]
        assert b["config_sha256"] == canonical_sha256(b["model_config"]) and b["model_config"]["layer_norm_eps"]
        d = tmp / "report-runs" / name
        d.mkdir(parents=True)
        write_results(d, res)
        files[name] = d / "results.json"
    same = report.Runs(report.load_runs([files["a"], files["b"]]))  # one model config: averaged
    assert same.stat("vcd", "layer_emb", "SS untrained", "layer_01").values == pytest.approx([0.6, 0.7])
    assert not same.config_unknown
    with pytest.raises(ValueError, match=r"different model configs \(config_sha256 \w+ vs \w+: hidden_act 'gelu' vs "
                                         r"'relu'; layer_norm_eps 1e-12 vs 1e-05; num_attention_heads 2 vs 4\)") as e:
        report.Runs(report.load_runs([files["a"], files["c"]]))
    assert str(files["a"]) in str(e.value) and str(files["c"]) in str(e.value)
    # written before results.json recorded the config: not refused, but named under every table it reaches
    old = json.loads(files["c"].read_text())
    for k in ("config_sha256", "model_config"):
        old["backbone"].pop(k)
    files["c"].write_text(json.dumps(old))
    runs = report.load_runs([files["a"], files["c"]])
    assert report.Runs(runs).config_unknown == [str(files["c"])]
    (t,) = report.build_tables(runs, "table8")
    assert "**Config unknown:** 1 of the 2 runs were written before" in t.note and str(files["c"]) in t.note
    assert str(files["a"]) not in t.note.split("**Config unknown:**")[1]  # (above it: demo shards, Not a result)
    # a hash without the record (written in between): refused all the same, saying the fields are unknown
    mid = json.loads(files["b"].read_text())
    mid["backbone"].pop("model_config")
    mid["backbone"]["config_sha256"] = "0" * 16
    files["b"].write_text(json.dumps(mid))
    with pytest.raises(ValueError, match="config fields were not recorded"):
        report.Runs(report.load_runs([files["a"], files["b"]]))
