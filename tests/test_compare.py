"""``python -m value_pl.compare``: three synthesised UNITER checkpoints -> three rows in step order,
differing metrics, outputs written; a second run is served from the cache and builds no backbone."""
import json
from pathlib import Path

import pytest
import torch

from conftest import compose

TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2}
SMALL_SUITE = ["suite.train_samples=48", "suite.val_samples=16", "suite.test_samples=32",
               "suite.analysis_samples=16", "suite.epochs=2", "suite.batch_size=16", "suite.rank=16",
               "suite.kmeans.n_init=2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from omegaconf import OmegaConf

    from value_pl.backbones import build_backbone

    d = tmp_path_factory.mktemp("ckpts")
    (d / "tiny.json").write_text(json.dumps(TINY))
    for seed, step in [(1, 1000), (2, 30), (3, 200)]:  # glob order != step order
        bb = build_backbone(OmegaConf.create({"family": "uniter", "config": str(d / "tiny.json"), "tokenizer": "minilm",
                                              "pretrained": False, "seed": seed}), img_dim=64)
        torch.save(dict(bb.state_dict()), d / f"ckpt_step{step}.pt")
    return d


def test_step_parsing_and_order(tmp_path):
    from value_pl.compare.checkpoints import discover, step_from_name

    assert step_from_name("ckpt_step1000.pt") == 1000
    assert step_from_name("epoch=3-step=1500.ckpt") == 1500
    assert step_from_name("checkpoint-5000") == 5000
    assert step_from_name("pretrain_iter20k.pt") == 20000
    assert step_from_name("model_LXRT.pth") is None
    # a step stored in the checkpoint dict; a bare number in the name; HF trainer_state.json
    torch.save({"global_step": 7, "state_dict": {}}, tmp_path / "last.pt")
    torch.save({}, tmp_path / "uniter_20k.pt")
    hf = tmp_path / "hfdir"
    hf.mkdir()
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 90}))
    cks = discover(str(tmp_path / "*"))
    assert [(Path(c.path).name, c.step, c.step_source) for c in cks] == [
        ("last.pt", 7, "checkpoint"), ("hfdir", 90, "trainer_state"), ("uniter_20k.pt", 20000, "name")]
    cks = discover([str(tmp_path / "last.pt"), str(tmp_path / "uniter_20k.pt")], steps=[5, 1])
    assert [c.step for c in cks] == [1, 5] and cks[0].step_source == "override"


def test_compare_three_checkpoints_then_cached(tmp_path, checkpoints, demo_root, monkeypatch, capsys):
    """What ``python -m value_pl.compare checkpoints=DIR/*.pt backbone=uniter ...`` runs (the entry point is
    a thin Hydra wrapper around ``compare(cfg)``), twice: in-process to keep the test fast."""
    import value_pl.backbones as B
    from value_pl.compare import compare

    run = tmp_path / "cmp"
    common = [f"checkpoints={checkpoints}/*.pt", "backbone=uniter", f"backbone.config={checkpoints}/tiny.json",
              "backbone.tokenizer=minilm", "backbone.img_dim=64", f"data.root={demo_root}", f"out={run}",
              *SMALL_SUITE]
    real_build, builds = B.build_backbone, []
    monkeypatch.setattr(B, "build_backbone", lambda *a, **k: builds.append(a) or real_build(*a, **k))
    compare(compose(common + ["logger=csv"], "compare"))
    assert len(builds) == 3
    out = capsys.readouterr().out
    res = json.loads((run / "compare.json").read_text())
    rows = res["rows"]
    assert [r["step"] for r in rows] == [30, 200, 1000]
    assert [Path(r["checkpoint"]).name for r in rows] == ["ckpt_step30.pt", "ckpt_step200.pt", "ckpt_step1000.pt"]
    assert all(r["computed"] for r in rows) and res["built"] == 3
    names = set(rows[0]["metrics"])
    for k in ("fusion/nmi/mean", "fusion/nmi/layer_02", "modality/text", "modality/image", "vcc/acc/best",
              "vrc/acc/best", "vrc/acc/layer_02"):
        assert k in names, sorted(names)
    assert all(set(r["metrics"]) == names for r in rows)
    assert len({json.dumps(r["metrics"], sort_keys=True) for r in rows}) == 3  # different weights, different numbers
    assert len({r["metrics"]["modality/text"] for r in rows}) == 3
    assert len({r["weights_checksum"] for r in rows}) == 3
    md = (run / "compare.md").read_text()
    assert md.index("ckpt_step30.pt") < md.index("ckpt_step200.pt") < md.index("ckpt_step1000.pt")
    assert sorted(x.name for x in (run / "plots").glob("*.png")) == sorted(
        n.replace("/", "__") + ".png" for n in names)
    assert len(list((run / "cache").glob("*-*.json"))) == 3
    csv = (run / "csv" / "metrics.csv").read_text().splitlines()
    assert len(csv) == 4 and "fusion/nmi/mean" in csv[0]
    assert "ckpt_step1000.pt (step 1000)" in out and "3 measured, 0 cached" in out

    # second run: every row from the cache -- no backbone built, no forward pass
    builds.clear()
    res2 = compare(compose(common + ["logger=none", "plots=false"], "compare"))
    assert builds == [] and res2["built"] == 0 and "0 measured, 3 cached" in capsys.readouterr().out
    assert [r["computed"] for r in res2["rows"]] == [False, False, False]
    assert [r["metrics"] for r in res2["rows"]] == [r["metrics"] for r in rows]
    assert json.loads((run / "compare.json").read_text())["rows"][0]["computed"] is False


def test_compare_cli_entry_composes():
    """The Hydra entry point's config: defaults and the suite group."""
    cfg = compose(["checkpoints=a.pt", "suite=full"], "compare")
    assert cfg.suite.name == "full" and cfg.backbone.family == "uniter" and cfg.logger.name == "wandb"
    import importlib

    entry = importlib.import_module("value_pl.compare.__main__")
    assert callable(entry.main)


def test_compare_hf_dirs_lxmert_and_bert(tmp_path):
    """Directories go to backbone.path; parts that do not apply to a family are reported as skipped:
    LXMERT (two-stream: no [CLS] modality importance), BERT (text only: sentence tasks on SentEval shards)."""
    from transformers import BertConfig, BertModel, LxmertConfig, LxmertModel

    import fixtures_data as F
    from helpers_backbones import VOCAB, tiny_tokenizer
    from value_pl.compare import compare

    small = ["logger=none", "plots=false", "suite.train_samples=16", "suite.val_samples=8", "suite.test_samples=8",
             "suite.analysis_samples=8", "suite.epochs=1", "suite.rank=8", "suite.kmeans.n_init=1"]
    lx = dict(vocab_size=len(VOCAB), hidden_size=16, num_attention_heads=2, intermediate_size=32, l_layers=1,
              r_layers=1, x_layers=2, visual_feat_dim=64, visual_pos_dim=4, max_position_embeddings=64)
    for seed, step in [(0, 500), (1, 100)]:
        torch.manual_seed(seed)
        d = tmp_path / "lxmert" / f"checkpoint-{step}"
        LxmertModel(LxmertConfig(**lx)).save_pretrained(str(d))
        tiny_tokenizer(d)
    res = compare(compose([f"checkpoints={tmp_path}/lxmert/checkpoint-*", "backbone=lxmert_hf",
                           f"out={tmp_path / 'lx_run'}", *small], "compare"))
    assert [r["step"] for r in res["rows"]] == [100, 500]
    assert all("modality" in r["skipped"] and "fusion/nmi/mean" in r["metrics"] and "vrc/acc/best" in r["metrics"]
               for r in res["rows"])

    sent = F.write_senteval(tmp_path / "senteval_raw")
    F.build("senteval", tmp_path / "senteval", sent)
    for seed, step in [(0, 20), (1, 10)]:
        torch.manual_seed(seed)
        d = tmp_path / "bert" / f"bert_step{step}"
        BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=64)).save_pretrained(str(d))
        tiny_tokenizer(d)
    res = compare(compose([f"checkpoints={tmp_path}/bert/*", "backbone=bert", "data.root=" + str(tmp_path / "senteval" / "bshift"),
                           "suite.tasks=[bshift]", "suite.analyses=[]", f"out={tmp_path / 'bert_run'}", *small], "compare"))
    assert [r["step"] for r in res["rows"]] == [10, 20]
    assert all("bshift/acc/best" in r["metrics"] and "bshift/acc/layer_02" in r["metrics"] for r in res["rows"])


def _names(cks):
    return [(Path(c.path).name, c.step, c.step_source) for c in cks]


def test_discover_symlinks_compared_once_under_the_stepped_name(tmp_path, capsys):
    """A ``latest.pt`` / ``last.ckpt`` symlink next to the checkpoints it points at: compared once, under the
    name that carries the step (not at list position 0 ahead of the others), and the dropped name is said."""
    import os

    from value_pl.compare.checkpoints import discover

    d = tmp_path / "links"
    d.mkdir()
    for s in (1000, 2000):
        torch.save({"w": torch.zeros(1) + s}, d / f"model_step{s}.pt")
    os.symlink("model_step2000.pt", d / "latest.pt")  # sorts first in the glob
    assert _names(discover(str(d / "*.pt"))) == [("model_step1000.pt", 1000, "name"), ("model_step2000.pt", 2000, "name")]
    out = capsys.readouterr().out
    assert "latest.pt" in out and "dropped" in out and "model_step2000.pt (step 2000)" in out
    # the link alone (its target not listed): the step comes from the target's name
    assert _names(discover([str(d / "latest.pt"), str(d / "model_step1000.pt")])) == [
        ("model_step1000.pt", 1000, "name"), ("latest.pt", 2000, "link_target")]
    # Lightning save_last="link": best.ckpt -> the step=1800 file, with the step stored in the file too
    lt = tmp_path / "lightning"
    lt.mkdir()
    for e, s in ((0, 900), (1, 1800)):
        torch.save({"global_step": s, "state_dict": {}}, lt / f"epoch={e}-step={s}.ckpt")
    os.symlink("epoch=1-step=1800.ckpt", lt / "best.ckpt")
    os.symlink(str(lt / "epoch=1-step=1800.ckpt"), lt / "last.ckpt")
    assert _names(discover(str(lt / "*.ckpt"))) == [("epoch=0-step=900.ckpt", 900, "name"),
                                                     ("epoch=1-step=1800.ckpt", 1800, "name")]
    assert "best.ckpt" in capsys.readouterr().out
    # explicit steps: one per name, or one per distinct file
    assert [c.step for c in discover(str(d / "*.pt"), steps=[7, 1, 7])] == [1, 7]
    assert [c.step for c in discover(str(d / "*.pt"), steps=[7, 1])] == [1, 7]
    with pytest.raises(ValueError, match="two steps"):
        discover(str(d / "*.pt"), steps=[5, 1, 7])


def test_discover_steps_from_directories_and_no_mixed_positions(tmp_path, capsys):
    """HF layouts take the step from the directory (not the string order of the paths); a checkpoint with
    no step among checkpoints with steps is an error that points at steps=[...]; with no step anywhere
    the list positions are used and said."""
    from value_pl.compare.checkpoints import discover

    hf = tmp_path / "hf"
    for s in (500, 1000, 1500):
        (hf / f"checkpoint-{s}").mkdir(parents=True)
        torch.save({"w": torch.zeros(1) + s}, hf / f"checkpoint-{s}" / "pytorch_model.bin")
    cks = discover(str(hf / "*" / "pytorch_model.bin"))
    assert [(Path(c.path).parent.name, c.step, c.step_source) for c in cks] == [
        ("checkpoint-500", 500, "dir_name"), ("checkpoint-1000", 1000, "dir_name"), ("checkpoint-1500", 1500, "dir_name")]
    # the grandparent: run/global_step300/export/model.bin
    for s in (300, 60):
        (tmp_path / "gp" / f"global_step{s}" / "export").mkdir(parents=True)
        torch.save({}, tmp_path / "gp" / f"global_step{s}" / "export" / "model.bin")
    assert [c.step for c in discover(str(tmp_path / "gp" / "*" / "export" / "model.bin"))] == [60, 300]

    mixed = tmp_path / "run_step3" / "ckpts"  # a directory name shared by several checkpoints gives no step
    mixed.mkdir(parents=True)
    for s in (1000, 2000):
        torch.save({"w": torch.zeros(1)}, mixed / f"uniter_step{s}.pt")
    torch.save({"w": torch.zeros(1)}, mixed / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt.*steps=\[") as e:
        discover(str(mixed / "*.pt"))
    assert "uniter_step1000.pt" not in str(e.value).split("while")[0]
    cks = discover(str(mixed / "*.pt"), steps=[3000, 1000, 2000])
    assert _names(cks) == [("uniter_step1000.pt", 1000, "override"), ("uniter_step2000.pt", 2000, "override"),
                           ("last.pt", 3000, "override")]

    plain = tmp_path / "plain"
    plain.mkdir()
    for n in ("b.pt", "a.pt"):
        torch.save({}, plain / n)
    capsys.readouterr()
    assert _names(discover([str(plain / "b.pt"), str(plain / "a.pt")])) == [("b.pt", 0, "index"), ("a.pt", 1, "index")]
    assert "list positions" in capsys.readouterr().out


def test_compare_cache_key_keeps_base_path_config_and_tokenizer(tmp_path, checkpoints, demo_root, monkeypatch):
    """For .pt checkpoints backbone.path (architecture config, tokenizer) and backbone.config stay in the
    cache key, with their files' contents: another base directory, or an edited config at the same path,
    is measured again instead of reusing stale rows; another name for the same bytes is still cached."""
    import shutil

    import value_pl.compare.driver as D
    from value_pl.compare import compare

    calls = []

    def fake_suite(backbone, suite, data):
        calls.append(backbone.config.layer_norm_eps)
        return {"metrics": {"fusion/nmi/mean": float(backbone.config.layer_norm_eps)}, "skipped": {},
                "forwards": 0, "seconds": 0.0}

    monkeypatch.setattr(D, "run_suite", fake_suite)
    bases = {}
    for name, eps in (("base_a", 1e-12), ("base_b", 1e-5)):
        bases[name] = tmp_path / name
        bases[name].mkdir()
        (bases[name] / "config.json").write_text(json.dumps(dict(TINY, layer_norm_eps=eps)))

    def run(base, ckpt=checkpoints / "ckpt_step30.pt"):
        res = compare(compose([f"checkpoints={ckpt}", "backbone=uniter", "backbone.config=null",
                               f"backbone.path={base}", "backbone.tokenizer=minilm", "backbone.img_dim=64",
                               f"data.root={demo_root}", f"out={tmp_path / 'run'}", "logger=none", "plots=false",
                               *SMALL_SUITE], "compare"))
        return res["built"], res["rows"][0]["metrics"]["fusion/nmi/mean"]

    assert run(bases["base_a"]) == (1, 1e-12)
    assert run(bases["base_b"]) == (1, 1e-5)  # another base: measured, not base_a's row
    assert run(bases["base_b"]) == (0, 1e-5)  # same again: cached
    (bases["base_b"] / "config.json").write_text(json.dumps(dict(TINY, layer_norm_eps=1e-6)))
    assert run(bases["base_b"]) == (1, 1e-6)  # same path, edited config: measured
    copy = tmp_path / "copies" / "renamed_step30.pt"
    copy.parent.mkdir()
    shutil.copy(checkpoints / "ckpt_step30.pt", copy)
    assert run(bases["base_b"], copy) == (0, 1e-6)  # the checkpoint's own path is not in the key, its bytes are
    assert calls == [1e-12, 1e-5, 1e-6]


def test_suite_layers_are_taken_per_task_layout(tmp_path, demo_root):
    """One suite `layers` list for every task: LXMERT's phrase-region layout has no layer_00 (its layers are the
    cross layers), the region-region one has; each task probes the listed layers it has. A name no layout has
    is an error."""
    import json as _json
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from value_pl.backbones import build_backbone
    from value_pl.compare.suite import _probe_module

    man = _json.loads((demo_root / "manifest.json").read_text())
    (tmp_path / "config.json").write_text(_json.dumps({
        "vocab_size": 30522, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "l_layers": 2,
        "r_layers": 2, "x_layers": 3, "visual_feat_dim": man["feature_dim"], "visual_pos_dim": 4,
        "max_position_embeddings": 128}))
    bb = build_backbone(OmegaConf.create({"family": "lxmert", "name": "tiny", "pretrained": False, "seed": 0,
                                          "config": str(tmp_path / "config.json"), "tokenizer": "minilm"}),
                        img_dim=man["feature_dim"])
    data = SimpleNamespace(manifest=man, root=demo_root)
    cfg = {"layers": [0, 2], "lr": 1e-3}
    assert _probe_module(bb, "vcc", cfg, data).head_names == ["emb:layer_02"]
    assert _probe_module(bb, "vrc", cfg, data).head_names == ["emb:layer_00", "emb:layer_02"]
    with pytest.raises(ValueError, match=r"\['layer_42'\] are no layers of this backbone"):
        _probe_module(bb, "vrc", {"layers": [2, 42], "lr": 1e-3}, data)


def test_steps_per_file_follow_the_order_the_error_asks_for(tmp_path):
    """A symlink that sorts before its target (best.pt -> u_step2000.pt) must not swap the steps a user gives in
    the order the "no training step" error lists the files."""
    import os

    import torch

    from value_pl.compare.checkpoints import discover

    for n in ("u_step1000.pt", "u_step2000.pt", "last.pt"):
        torch.save({"w": torch.zeros(1)}, tmp_path / n)
    os.symlink("u_step2000.pt", tmp_path / "best.pt")
    with pytest.raises(ValueError, match="in this order: ") as e:
        discover(str(tmp_path / "*.pt"))
    order = str(e.value).split("in this order: ")[1].split(" -- ")[0].split(", ")
    want = {"last.pt": 3000, "u_step1000.pt": 1000, "u_step2000.pt": 2000}
    got = discover(str(tmp_path / "*.pt"), steps=[want[n] for n in order])
    assert {Path(c.path).name: c.step for c in got} == want


def test_suite_task_without_validation_examples_is_not_measured(tmp_path, demo_root):
    """No validation examples (``val_samples=0``, or a split without the task's labels): the heads could not be
    selected and kept their initial weights, so the suite reported an untrained head's test accuracy (the same
    for 0 and 3 epochs) and ``val/best = -1``. The task is now listed under ``skipped`` with no numbers."""
    from omegaconf import OmegaConf

    from value_pl.backbones import build_backbone
    from value_pl.compare.suite import SuiteData, run_suite, suite_config

    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    bb = build_backbone(OmegaConf.create({"family": "uniter", "config": str(tmp_path / "tiny.json"),
                                          "tokenizer": "minilm", "pretrained": False, "seed": 1}), img_dim=64)
    suite = suite_config({"train_samples": 32, "val_samples": 0, "test_samples": 16, "analyses": [], "epochs": 1,
                          "rank": 8, "batch_size": 16, "tasks": ["vrc"]})
    res = run_suite(bb, suite, SuiteData.load(demo_root, suite))
    assert res["metrics"] == {} and "no vrc examples among the first 0 val samples" in res["skipped"]["vrc"]
    suite["val_samples"] = 16
    res = run_suite(bb, suite, SuiteData.load(demo_root, suite))
    assert "vrc" not in res["skipped"] and res["metrics"]["vrc/val/best"] >= 0


@pytest.mark.parametrize("family", ["uniter", "lxmert"])
def test_suite_attention_features_are_the_pairs_own_rows(tmp_path, demo_root, monkeypatch, family):
    """The suite captures attention rows once for every probe and analysis (``merge_captures``: rows sorted and
    merged), so a collator's slots -- its own request's order -- no longer index them: each pair's Eq. 3 input
    must be its own tokens' attention, as with full maps. (It was some other token's for every vcc pair.)"""
    from omegaconf import OmegaConf

    from value_pl.backbones import build_backbone
    from value_pl.backbones.capture import CaptureSpec
    from value_pl.compare.suite import SuiteData, run_suite, suite_config
    from value_pl.probers.features import PairPlan

    if family == "uniter":
        (tmp_path / "tiny.json").write_text(json.dumps(TINY))
        cfg, dim = {"family": "uniter", "config": str(tmp_path / "tiny.json")}, 64
    else:
        man = json.loads((demo_root / "manifest.json").read_text())
        dim = man["feature_dim"]
        (tmp_path / "lx.json").write_text(json.dumps({
            "vocab_size": 30522, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "l_layers": 2,
            "r_layers": 2, "x_layers": 2, "visual_feat_dim": dim, "visual_pos_dim": 4,
            "max_position_embeddings": 128}))
        cfg = {"family": "lxmert", "config": str(tmp_path / "lx.json")}
    bb = build_backbone(OmegaConf.create({**cfg, "tokenizer": "minilm", "pretrained": False, "seed": 1}), img_dim=dim)
    seen = []
    inputs = PairPlan.inputs

    def spy(self, out, batch, spec=None, merged=False):
        res = inputs(self, out, batch, spec, merged)
        if self.maps_ab:
            seen.append((self, batch, res))
        return res

    monkeypatch.setattr(PairPlan, "inputs", spy)
    suite = suite_config({"train_samples": 16, "val_samples": 8, "test_samples": 8, "epochs": 1, "rank": 8,
                          "batch_size": 16, "tasks": ["vcc", "vrc"], "prober": "attention"})
    run_suite(bb, suite, SuiteData.load(demo_root, suite))
    assert {p.pair_kind for p, _, _ in seen} == {"phrase_region", "region_region"}
    for plan, batch, got in seen:
        spec = plan.capture(batch)
        full = CaptureSpec(hidden=spec.hidden, attn=spec.attn, rows=None)
        with torch.no_grad():
            want = inputs(plan, bb(batch, full), batch, full)
        for g in want:
            for x, y in zip(got[g], want[g]):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
