"""What a run reports: an empty split is an error at start, results.json is strict JSON (no NaN), and the data
counters (samples, dropped pairs, truncation) are per split and one pass each, not accumulated over epochs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import compose
from test_cache import FAST, small_demo, tiny_backbone


def _vrc_pairs_beyond(man_root, split: str, max_regions: int) -> tuple[int, int]:
    """(pairs of vrc in the split, of which a region index >= max_regions), read from the shards."""
    from value_pl.data.datamodule import ShardDataModule
    from value_pl.data.schema import decode_sample

    dm = ShardDataModule(man_root)
    st = dm.stream(split, train=False, collate=list)
    total = cut = 0
    for s in map(decode_sample, st.raw()):
        for a, b, _ in s["meta"]["pairs"]["vrc"]:
            total += 1
            cut += int(a >= max_regions or b >= max_regions)
    return total, cut


def test_an_empty_split_is_an_error_at_start(tmp_path):
    from value_pl.driver.setup import build_module, make_datamodule

    root = tmp_path / "demo"
    small_demo(root, splits={"train": 8, "val": 4, "test": 4})
    man = json.loads((root / "manifest.json").read_text())
    man["splits"]["val"]["pairs"].pop("vrc")
    (root / "manifest.json").write_text(json.dumps(man))
    cfg = compose(["task=vrc", f"data.root={root}", *tiny_backbone(tmp_path), "logger=none"])
    with pytest.raises(ValueError, match=r"demo: split 'val' \(4 samples\) has no vrc example"):
        build_module(cfg, make_datamodule(cfg))


@pytest.mark.slow
def test_counters_are_per_split_and_one_pass_and_json_is_strict(tmp_path):
    from value_pl.driver.train import train

    root = tmp_path / "demo"
    small_demo(root, splits={"train": 24, "val": 12, "test": 12})
    R = 5  # fewer regions than the demo's 10: pairs on regions 5..9 are dropped, and counted
    res = train(compose(["task=vrc", "prober=layer_emb", f"data.root={root}", *tiny_backbone(tmp_path),
                         f"backbone.max_regions={R}", "layers=[1]", "trainer.max_epochs=3",
                         f"run_dir={tmp_path / 'run'}", *[f for f in FAST if "max_epochs" not in f]]))
    for split in ("val", "test"):
        total, cut = _vrc_pairs_beyond(root, split, R)
        assert 0 < cut < total
        assert res["pairs_dropped"][split] == cut  # one pass, not 3 validation epochs' worth
        assert res["pairs_evaluated"][split] == total - cut
        assert res["truncated"][split] == {"texts": 0, "phrases": 0, "regions": 12}
    assert res["samples_seen"]["val"] == [12, 12, 12] and res["truncated"]["max_regions"] == R
    # how the heads were trained, for the report's check that a cell's seeds differ only in their seed
    assert {k: res["training"][k] for k in ("max_epochs", "world_size", "lr", "precision")} == {
        "max_epochs": 3, "world_size": 1, "lr": 0.001, "precision": "32"}
    text = (tmp_path / "run" / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))


def test_unmeasured_accuracies_are_null_not_nan(tmp_path):
    from value_pl.driver.results import json_safe, results_markdown

    res = json_safe({"task": "vrc", "prober": "layer_emb", "backbone": {"name": "x", "pretrained": False}, "seed": 0,
                     "chance": 0.1, "majority": None, "best": None,
                     "layers": [{"layer": 1, "name": "layer_01", "val_acc": float("nan"), "test_acc": None}]})
    assert res["layers"][0]["val_acc"] is None
    md = results_markdown(res)
    assert "nan" not in md.lower() and "| 1 | layer_01 | layer_01 | - | - |" in md


def test_counters_add_on_the_host_until_computed():
    """Per-step counter updates are host additions (no device op per step); compute and reset see them."""
    from value_pl.probers.metrics import Counters

    c = Counters()
    for n in (3, 4, 5):
        c.update({"samples": n, "pairs": 2 * n, "pairs_dropped": 1})
    assert int(c.samples) == 0  # nothing on the device yet
    assert c.compute() == {"samples": 12, "pairs": 24, "pairs_dropped": 3, "texts_truncated": 0,
                           "phrases_dropped": 0, "regions_truncated": 0}
    c.reset()
    c.update({"samples": 1})
    c.reset()
    c.update({})
    assert c.compute()["samples"] == 0


@pytest.mark.slow
def test_senteval_and_mdl_report_truncation_as_the_lightning_loop(tmp_path):
    """SentEval and MDL read each split once outside Lightning: results.json still has per-split counts
    (``truncated``, ``pairs_dropped``, ``pairs_evaluated``, ``samples_seen``), zeros as zeros, never ``null``, and the
    same as a Lightning run of the same task on the same data."""
    from tasks_helpers import FAST_DATA, one_thread, sentence_shards, tiny_backbones
    from value_pl.data.datamodule import ShardDataModule
    from value_pl.data.schema import decode_sample
    from value_pl.driver.train import train

    root = sentence_shards(tmp_path / "sent", n=(48, 16, 16))
    limit = 8  # [CLS] + 6 words + [SEP]: every word of the tiny vocabulary is one piece
    dm = ShardDataModule(root)
    n, long = {}, {}
    for split in ("train", "val", "test"):
        lens = [len(decode_sample(s)["meta"]["words"]) for s in dm.stream(split, train=False, collate=list).raw()]
        n[split], long[split] = len(lens), sum(L + 2 > limit for L in lens)
        assert 0 < long[split] < n[split]
    common = ["task=sentlen", f"data.root={root}", *tiny_backbones(tmp_path / "bb")["BERT"],
              f"backbone.max_text_len={limit}", "logger=none", "progress=false", "trainer.enable_progress_bar=false",
              "trainer.max_epochs=1", *FAST_DATA]
    with one_thread():
        runs = {
            "senteval": train(compose([*common, "prober=senteval_lr", "prober.max_epoch=1", "prober.epoch_size=1",
                                       f"run_dir={tmp_path / 'senteval'}"])),
            "mdl": train(compose([*common, "prober=layer_emb", "mdl=true", "mdl_opts.max_epochs=1",
                                  "mdl_opts.fractions=[0.5,1.0]", f"run_dir={tmp_path / 'mdl'}"])),
            "lightning": train(compose([*common, "prober=layer_emb", f"run_dir={tmp_path / 'lightning'}"])),
        }
    for name, res in runs.items():
        on_disk = json.loads((tmp_path / name / "results.json").read_text())
        for r in (res, on_disk):
            for split in ("train", "val", "test"):
                assert r["truncated"][split] == {"texts": long[split], "phrases": 0, "regions": 0}, (name, split)
            assert r["truncated"]["text_limit"] == limit
            assert r["pairs_dropped"] == {"train": 0, "val": 0, "test": 0}, name
            assert r["pairs_evaluated"] == {"val": n["val"], "test": n["test"]}, name
            assert r["samples_seen"] == {s: [n[s]] for s in n}, name
    assert "Truncated (per split, one pass): train: " in (tmp_path / "senteval" / "results.md").read_text()


def test_majority_is_the_training_majority_class_scored_on_test():
    from value_pl.probers.metrics import LabelCounts, majority_baseline

    assert majority_baseline([700, 300], [300, 700]) == 0.3  # not 0.7: the class is chosen on train
    assert majority_baseline([5, 5, 1], [1, 2, 7]) == 0.1  # ties: the first label
    assert majority_baseline([0, 0], [1, 1]) is None and majority_baseline([1], None) is None
    from value_pl.data.collate import label_histogram

    m = LabelCounts(4)
    for labels in ([0, 3, 3, 1], [], [3]):  # histograms as the collator counts them (trailing zeros left out)
        m.update(label_histogram(np.asarray(labels)))
    assert m.counts.tolist() == [0, 0, 0, 0]  # added on the host until computed: no device op per step
    assert m.compute() == [1, 1, 0, 3]
    m.reset()
    assert m.compute() == [0, 0, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("relabel", ["none", "control=true", "shuffle_labels=true"])
def test_majority_comes_from_the_labels_the_run_trained_and_tested_on(tmp_path, relabel):
    """results.json's majority: the most frequent label of the training epoch, scored on the test labels, both as
    the heads saw them -- after the control task's or the shuffled-label relabelling."""
    from value_pl.driver.setup import prepare
    from value_pl.driver.train import train
    from value_pl.probers.metrics import majority_baseline

    root = tmp_path / "demo"
    small_demo(root, splits={"train": 24, "val": 8, "test": 12})
    ov = ["task=vrc", "prober=layer_emb", f"data.root={root}", *tiny_backbone(tmp_path), "layers=[1]",
          f"run_dir={tmp_path / 'run'}", *[f for f in FAST if "train_batches" not in f]]
    ov += [] if relabel == "none" else [relabel]
    res = train(compose(ov))
    _, dm, module, _ = prepare(compose(ov))
    counts = {}
    for split in ("train", "test"):
        c = [0] * len(module.labels)
        for b in dm.loader(split, train=False):
            for y in b["labels"].tolist():
                c[y] += 1
        counts[split] = c
    assert sum(counts["test"]) == res["pairs_evaluated"]["test"] > 0
    assert res["majority"] == majority_baseline(counts["train"], counts["test"])


@pytest.mark.slow
def test_eval_of_a_control_prober_with_the_raw_baseline_relabels_and_loads_as_trained(tmp_path):
    """python -m value_pl.eval restores from the checkpoint what its heads need (the raw-feature head) and the
    labels they were trained on (the control task): the same test accuracies as the training run."""
    from value_pl.driver.train import evaluate, train

    root = tmp_path / "demo"
    small_demo(root, splits={"train": 24, "val": 8, "test": 12})
    res = train(compose(["task=vrc", "prober=layer_emb", f"data.root={root}", *tiny_backbone(tmp_path),
                         "layers=[1]", "raw_baseline=true", "control=true", "control_seed=7",
                         f"run_dir={tmp_path / 'run'}", *FAST]))
    ev = evaluate(compose([f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}", f"data.root={root}",
                           *tiny_backbone(tmp_path), "logger=none", "trainer.enable_progress_bar=false",
                           f"run_dir={tmp_path / 'eval'}"], config_name="eval"))
    assert ev["control"] and ev["control"]["seed"] == 7 == res["control"]["seed"]
    assert {r["name"] for r in ev["layers"]} == {r["name"] for r in res["layers"]} >= {"raw", "layer_01"}
    acc = {r["name"]: r["test_acc"] for r in res["layers"]}
    assert {r["name"]: r["test_acc"] for r in ev["layers"]} == pytest.approx(acc)


def test_selectivity_pairs_a_control_run_only_with_a_task_run_of_the_same_model_config(tmp_path):
    """A control run's selectivity takes the task run beside it of the same backbone: the same weights built with
    another model config (``config_sha256``) are another model; a task run written before the hash was recorded is
    still taken (not comparable, not refused)."""
    from value_pl.driver.results import matching_task_run

    def res(h, control):
        b = {"name": "minilm-uniter", "checksum": "c0"} | ({"config_sha256": h} if h else {})
        return {"task": "vrc", "prober": "layer_emb", "seed": 0, "control": control, "backbone": b,
                "data": {"root": "/shards/vg"}}

    ctrl = tmp_path / "ctrl"
    for h, want in (("aaa", True), ("bbb", False), (None, True)):
        (tmp_path / "task").mkdir(exist_ok=True)
        (tmp_path / "task" / "results.json").write_text(json.dumps(res(h, False)))
        got = matching_task_run(res("aaa", {"types": 3}), ctrl)
        assert (got is not None) == want, h


def test_control_rows_are_never_the_best_layer():
    """The raw region features (``raw_baseline``, the paper's "Original visual emb." / Fig. 4's dashed line) and
    the boxes alone (``geometry_baseline``) are baselines beside the layers: even when one scores best on
    validation, the run's best layer is a layer."""
    from value_pl.driver.results import best_layer
    from value_pl.probers.module import CONTROL_HEADS

    rows = [{"name": "layer_01", "layer": 1, "val_acc": 0.61, "test_acc": 0.60},
            {"name": "layer_02", "layer": 2, "val_acc": 0.66, "test_acc": 0.64},
            {"name": "raw", "layer": -1, "val_acc": 0.81, "test_acc": 0.80},
            {"name": "boxes", "layer": -1, "val_acc": 0.91, "test_acc": 0.90}]
    assert best_layer(rows)["name"] == "layer_02"
    assert best_layer(rows[2:]) is None and best_layer([]) is None
    assert set(CONTROL_HEADS) == {"emb:raw", "emb:boxes"}  # the checkpoint monitor val/acc/best skips both
