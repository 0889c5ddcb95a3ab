"""fast_dev_run of every task x prober x backbone kind (tiny random backbones), in-process."""
import json

import pytest

from conftest import compose
from tasks_helpers import FAST_DATA, SENT_TASKS, one_thread, sentence_shards, tiny_backbones

FAST = ["logger=none", "trainer.enable_progress_bar=false", "trainer.fast_dev_run=true", *FAST_DATA]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def bbs(tmp_path_factory):
    return tiny_backbones(tmp_path_factory.mktemp("tiny_bb"))


@pytest.fixture(scope="module")
def sent_root(tmp_path_factory):
    return sentence_shards(tmp_path_factory.mktemp("sent") / "senteval")


def run(overrides, d):
    from value_pl.driver.train import train

    res = train(compose([*overrides, *FAST, f"run_dir={d}"]))
    assert json.loads((d / "results.json").read_text())["task"] == res["task"]
    return res


@pytest.mark.parametrize("kind", ["SS", "TS"])
@pytest.mark.parametrize("prober", ["layer_emb", "attention"])
@pytest.mark.parametrize("task", ["vcd", "vcc", "vri", "vrc"])
def test_pair_tasks(task, prober, kind, bbs, demo_root, tmp_path):
    extra = ["raw_baseline=true"] if task in ("vri", "vrc") else []
    if task == "vcc":
        extra.append("control=true")
    res = run([f"task={task}", f"prober={prober}", f"data.root={demo_root}", *bbs[kind], *extra], tmp_path)
    names = [r["name"] for r in res["layers"]]
    assert bool(res["control"]) == (task == "vcc")
    if task == "vcc":  # the demo's types: (phrase words, object class name)
        assert res["control"]["types"] > 10 and res["control"]["seed"] == 0
    if prober == "attention":
        assert "all_heads" in names
        # two-stream coreference: the 2 cross layers (tiny model) through l2v+v2l maps
        if kind == "TS" and task in ("vcd", "vcc"):
            assert names == ["layer_01", "layer_02", "all_heads"]
    else:
        if task in ("vri", "vrc"):
            assert names[-1] == "raw" and res["layers"][-1]["layer"] == -1
            if kind == "TS":  # the visual stream: embeddings + 1 r-layer + 2 cross layers
                assert names[:-1] == ["layer_00", "layer_01", "layer_02", "layer_03"]
        elif kind == "TS":
            assert names == ["layer_01", "layer_02"]
    titles = {r["name"]: r["title"] for r in res["layers"]}
    if kind == "TS" and task in ("vcd", "vcc"):  # the cross layers, also in Table 1's 0-based numbering
        assert titles["layer_01"] == "Layer 1: cross layer 0 of Table 1"
    if kind == "TS" and task in ("vri", "vrc") and prober == "layer_emb":  # visual stream: 1 r-layer, 2 cross
        assert [titles[f"layer_0{k}"] for k in range(4)] == [
            "Visual embeddings", "Layer 1: visual layer 1", "Layer 2: cross layer 0 of Table 1",
            "Layer 3: cross layer 1 of Table 1"]
        assert titles["raw"] == "Original visual emb."
    if kind == "SS" and prober == "layer_emb":
        assert titles["layer_00"] == "Embeddings" and titles["layer_01"] == "Layer 1"  # never "Layer 1" for emb.
    assert all(r["test_acc"] == r["test_acc"] for r in res["layers"])


@pytest.mark.parametrize("kind", ["SS", "TS", "BERT"])
@pytest.mark.parametrize("prober", ["senteval_mlp", "senteval_lr"])
def test_sentence_kinds(kind, prober, bbs, sent_root, tmp_path):
    res = run(["task=sentlen", f"prober={prober}", f"data.root={sent_root}", *bbs[kind]], tmp_path)
    layers = [r["name"] for r in res["layers"]]
    assert layers == ["layer_00", "layer_01", "layer_02"]  # tiny: embeddings + 2 (LXMERT: language layers only)
    assert res["layers"][0]["title"] == "Embeddings"
    assert res["protocol"]["name"] == "senteval" and res["protocol"]["grid_size"] == 1
    assert all(0 <= r["test_acc"] <= 1 for r in res["layers"])
    assert res["layers"][0]["nhid"] == (0 if prober == "senteval_lr" else 50)


@pytest.mark.parametrize("task", SENT_TASKS)
def test_sentence_tasks(task, bbs, sent_root, tmp_path):
    for prober in ("senteval_mlp", "senteval_lr"):
        res = run([f"task={task}", f"prober={prober}", f"data.root={sent_root}", *bbs["SS"]], tmp_path / prober)
        assert res["task"] == task and len(res["layers"]) == 3
        if task == "wordcontent":
            assert res["layers"][0]["nhid"] == 0  # SentEval forces logistic regression


def test_sentence_plain_lightning_and_control(bbs, sent_root, tmp_path):
    """A sentence task through the plain Lightning loop (SentenceProber) and as a control task."""
    res = run(["task=tense", "prober=layer_emb", f"data.root={sent_root}", "control=true", *bbs["BERT"]], tmp_path)
    assert res["control"] and [r["name"] for r in res["layers"]] == ["layer_00", "layer_01", "layer_02"]
