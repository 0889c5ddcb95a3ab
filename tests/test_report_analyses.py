"""``python -m value_pl.report`` on ``python -m value_pl.analyze`` runs: Tables 1, 2, 4, 7 and Figs. 2-3's numbers.

Real analyze runs (the driver, as ``python -m value_pl.analyze``) on the demo shards with two small untrained
backbones, a single-stream one (MiniLM-UNITER, seeds 0 and 1) and a tiny two-stream LXMERT, a capped sample each.
"""
from __future__ import annotations

import json
import shutil
import statistics

import pytest

from conftest import compose

ANALYSES = "analysis.run=[fusion,modality,i2t,coref,relation]"


@pytest.fixture(scope="module")
def analyze_runs(tmp_path_factory, demo_root):
    from value_pl.driver.analyze import analyze

    d = tmp_path_factory.mktemp("analyze")
    lx = d / "lxmert.json"
    lx.write_text(json.dumps({
        "vocab_size": 30522, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "l_layers": 2,
        "r_layers": 2, "x_layers": 3, "visual_feat_dim": 64, "visual_pos_dim": 4, "max_position_embeddings": 128}))
    common = ["analysis=all", ANALYSES, f"data.root={demo_root}", "max_samples=6", "batch_size=6", "progress=false",
              "logger=none", "backbone.pretrained=false"]
    ts = ["backbone.family=lxmert", "backbone.name=tiny-lxmert", f"backbone.config={lx}", "backbone.tokenizer=minilm"]
    runs = {"ss0": ["seed=0"], "ss1": ["seed=1"], "ts0": ["seed=0", *ts]}
    for name, extra in runs.items():
        analyze(compose([*common, *extra, f"+run_dir={d / 'sweep' / name}"], "analyze"))
    return d / "sweep"


def _load(run, name):
    return json.loads((run / f"{name}.json").read_text())


def _tables(paths, layout):
    from value_pl.report import build_tables, load_analyses, load_runs

    return {t.name: t for t in build_tables(load_runs(paths), layout, load_analyses(paths))}


def test_analyze_records_what_the_report_needs(analyze_runs):
    fusion = _load(analyze_runs / "ss0", "fusion")
    assert fusion["data"]["dataset"] == "demo" and fusion["data"]["split_samples"] == 160
    assert fusion["seed"] == 0 and fusion["max_samples"] == 6 and fusion["samples_seen"] == 6
    assert fusion["backbone"]["pretrained"] is False and fusion["layers"][0]["table1"] == "emb."  # kept fields
    from value_pl.data.hashing import canonical_sha256  # the backbone's model config, with its hash

    assert fusion["backbone"]["config_sha256"] == canonical_sha256(fusion["backbone"]["model_config"])
    summary = _load(analyze_runs / "ts0", "analysis")
    assert summary["max_samples"] == 6 and summary["data"]["dataset"] == "demo"


def test_table1_2_4_7_hold_each_runs_numbers(analyze_runs):
    T = _tables([analyze_runs], "table1,table2,table4,table7")
    ss = [_load(analyze_runs / s, "fusion") for s in ("ss0", "ss1")]
    ts = _load(analyze_runs / "ts0", "fusion")
    t1 = T["table1"]
    assert t1.cols == [str(i) for i in range(12)]  # the paper's Table 1 columns 0..11
    assert t1.rows == ["SS untrained / demo", "TS untrained / demo"]
    for c in t1.cols:
        vals = [next((r["nmi"] for r in f["layers"] if r["table1"] == c), None) for f in ss]
        cell = t1.cells[("SS untrained / demo", c)]
        if c in ("0", "1", "2", "3", "4", "5"):  # MiniLM's 6 layers; two seeds: mean and a 95% interval
            assert cell.values == vals and cell.mean == statistics.fmean(vals) and cell.n == 2
        else:
            assert cell == "–"
    assert [t1.cells[("TS untrained / demo", c)].values for c in "012"] == [[r["nmi"]] for r in ts["layers"]]
    assert t1.cells[("TS untrained / demo", "3")] == "–"  # 3 cross layers; the paper's LXMERT has 5
    assert "| TS untrained / demo | " + " | ".join(f"{r['nmi']:.2f}" for r in ts["layers"]) in t1.markdown()

    coref = _load(analyze_runs / "ts0", "coref")
    t2 = T["table2"]
    assert t2.cols == ["V→T", "T→V", "V→T (Rand.)", "T→V (Rand.)", "pairs"]
    for r in coref["types"]:
        row = f"TS untrained, demo: {r['type']}"
        for col, k in (("V→T", "vt"), ("T→V", "tv"), ("V→T (Rand.)", "vt_rand"), ("T→V (Rand.)", "tv_rand")):
            assert t2.cells[(row, col)].values == [r[k]["value"]] and t2.cells[(row, col)].tag == r[k]["head"]
        assert t2.text(row, "V→T") == f"{r['vt']['value']:.3f} ({r['vt']['head']})"
    ss_rows = [x for x in t2.rows if x.startswith("SS untrained")]
    assert ss_rows[0] == "SS untrained, demo: people" and t2.rows.index(ss_rows[-1]) < t2.rows.index(row)
    # Table 7: the ratio of the type's V->T head, one row per model, the types as columns
    t7 = T["table7"]
    assert t7.rows == ["Ratio (SS untrained, demo)", "Ratio (TS untrained, demo)"] and t7.cols[0] == "people"
    for r in coref["types"]:
        cell = t7.cells[("Ratio (TS untrained, demo)", r["type"])]
        assert cell.values == [r["table7"]["ratio"]] and cell.tag == r["table7"]["head"]

    rel = _load(analyze_runs / "ts0", "relation")
    t4 = T["table4"]
    assert t4.cols == ["SS untrained, demo", "SS untrained, demo (Rand.)", "TS untrained, demo",
                       "TS untrained, demo (Rand.)"]
    for r in rel["types"]:
        assert t4.cells[(r["type"], "TS untrained, demo")].values == [r["max"]["value"]]
        assert t4.cells[(r["type"], "TS untrained, demo (Rand.)")].values == [r["rand"]["value"]]
    present = [x for x in ("on", "standing in", "wearing", "playing", "eating", "holds", "covering") if x in t4.rows]
    assert t4.rows[: len(present)] == present  # the paper's relations first, in its order
    for t in (t1, t2, t4, t7):  # every run read 6 samples of 160 on purpose, on synthetic shards
        assert "**Not a result:** of the " in t.note and "capped sample (max_samples=6, 6 of 160" in t.note, t.name
        assert "synthetic demo shards" in t.note


def test_modality_layout_and_auto(analyze_runs, tmp_path):
    from value_pl.report.__main__ import main

    mod = _load(analyze_runs / "ss0", "modality")
    mod1 = _load(analyze_runs / "ss1", "modality")
    T = _tables([analyze_runs], "auto")
    assert {"table1", "table2", "table4", "table7", "modality", "modality_heads"} <= set(T)
    m = T["modality"]
    assert m.cells[("Layer 1", "text MI (SS untrained, demo)")].values == [mod["layers"][0]["text"],
                                                                          mod1["layers"][0]["text"]]
    assert m.cells[("overall (mean per head)", "image MI (SS untrained, demo)")].values[0] == mod["overall"]["image_mean"]
    assert T["modality_heads"].cells[("1-2", "text MI (SS untrained, demo)")].values[0] == mod["heads"]["text"][0][1]
    assert not any("TS" in c for c in m.cols)  # modality importance needs a single stream (skipped for LXMERT)
    assert main([str(analyze_runs / "ts0"), "--layout", "table1", "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report-table1.md").read_text()
    assert "| TS untrained / demo |" in md and "SS untrained" not in md and "**Not a result:**" in md
    assert (tmp_path / "r" / "table1.csv").read_text().startswith("table,row,column,mean")


def test_duplicates_mixed_backbones_and_settings_are_refused(analyze_runs, tmp_path):
    dup = tmp_path / "again" / "ss0"
    shutil.copytree(analyze_runs / "ss0", dup)
    with pytest.raises(ValueError, match="same seed 0") as e:
        _tables([analyze_runs, tmp_path / "again"], "table1")
    msg = str(e.value)  # both files named (the first analysis file the two runs share)
    assert f"{analyze_runs / 'ss0'}/coref.json" in msg and f"{dup}/coref.json" in msg
    for f in dup.glob("*.json"):  # another single-stream backbone under the label "SS untrained"
        res = json.loads(f.read_text())
        res["backbone"]["name"] = "other-uniter"
        f.write_text(json.dumps(res))
    with pytest.raises(ValueError, match="different backbones share the model label 'SS untrained'") as e:
        _tables([analyze_runs, tmp_path / "again"], "table1")
    assert "other-uniter" in str(e.value)
    for f in dup.glob("*.json"):  # the same backbone, seed 2, but a different sample cap
        res = json.loads(f.read_text())
        res["backbone"]["name"], res["seed"], res["max_samples"] = "minilm-uniter", 2, 12
        f.write_text(json.dumps(res))
    with pytest.raises(ValueError, match="differ in max_samples 6 vs 12"):
        _tables([analyze_runs, tmp_path / "again"], "table1")


def test_seeds_of_one_backbone_under_other_model_configs_are_refused(analyze_runs, tmp_path):
    """Analyze outputs carry the backbone's model config: a seed whose backbone has the same weights but another
    ``layer_norm_eps`` is not averaged with the others (both files and the field named); outputs written before the
    config was recorded are named under their tables (config unknown), not refused."""
    run = tmp_path / "other" / "ss2"
    shutil.copytree(analyze_runs / "ss0", run)
    for f in run.glob("*.json"):
        res = json.loads(f.read_text())
        res["seed"] = 2
        res["backbone"]["model_config"]["layer_norm_eps"] = 1e-5
        res["backbone"]["config_sha256"] = "f" * 16
        f.write_text(json.dumps(res))
    with pytest.raises(ValueError, match=r"analyze runs of one backbone under the model label 'SS untrained' ran it "
                                         r"with different model configs \(config_sha256 \w+ vs f+: layer_norm_eps "
                                         r"1e-12 vs 1e-05\)") as e:
        _tables([analyze_runs, tmp_path / "other"], "table2")
    assert str(analyze_runs / "ss0") in str(e.value) and str(run) in str(e.value)
    for f in run.glob("*.json"):
        res = json.loads(f.read_text())
        for k in ("config_sha256", "model_config"):
            res.get("backbone", {}).pop(k, None)
        f.write_text(json.dumps(res))
    T = _tables([analyze_runs, tmp_path / "other"], "table1,table2")
    for t in T.values():
        want = run / ("fusion.json" if t.name == "table1" else "coref.json")
        assert "**Config unknown:** 1 of the 4 analyze runs were written before" in t.note and str(want) in t.note
        assert str(analyze_runs / "ss0") not in t.note.split("Config unknown")[1]
    assert T["table2"].rows[0].startswith("SS untrained") and "/" in T["table2"].text(T["table2"].rows[0], "pairs")


def test_seeds_averaged_over_pairs_and_over_samples_are_not_mixed(analyze_runs, tmp_path):
    """Tables 2 and 4 record what their means are over (``maxattn.average``): a seed averaged over samples is not
    averaged with seeds averaged over pairs; files written before the setting existed averaged over pairs."""
    assert _load(analyze_runs / "ss0", "coref")["maxattn"] == {"average": "pairs"}
    assert _load(analyze_runs / "ss0", "relation")["maxattn"] == {"average": "pairs"}
    run = tmp_path / "s" / "ss2"
    shutil.copytree(analyze_runs / "ss0", run)
    for f in run.glob("*.json"):
        res = json.loads(f.read_text())
        res["seed"] = 2
        if res.get("analysis") in ("coref", "relation"):
            res["maxattn"]["average"] = "samples"
        f.write_text(json.dumps(res))
    with pytest.raises(ValueError, match="differ in maxattn.average 'pairs' vs 'samples'") as e:
        _tables([analyze_runs, tmp_path / "s"], "table2")
    assert f"{run}/coref.json" in str(e.value) and f"{analyze_runs / 'ss0'}/coref.json" in str(e.value)
    (run / "coref.json").unlink()  # Table 4's relation runs alone
    with pytest.raises(ValueError, match="relation / SS untrained / demo differ in maxattn.average 'pairs' vs 'samples'"):
        _tables([analyze_runs, tmp_path / "s"], "table4")
    shutil.copy(analyze_runs / "ss0" / "coref.json", run / "coref.json")
    res = json.loads((run / "coref.json").read_text())
    (run / "coref.json").write_text(json.dumps({**res, "seed": 2, "maxattn": {"average": "samples"}}))
    T = _tables([tmp_path / "s"], "table2,table4")  # on their own: said in the notes
    assert "mean over samples of each sample's mean over its linked pairs" in T["table2"].note
    assert "mean over samples of each sample's mean" in T["table4"].note
    for f in run.glob("*.json"):  # as written before the setting: pairs, the only averaging then
        res = json.loads(f.read_text())
        res.pop("maxattn", None)
        f.write_text(json.dumps(res))
    T = _tables([analyze_runs, tmp_path / "s"], "table2")
    assert "mean over linked pairs" in T["table2"].note and "/" in T["table2"].text(T["table2"].rows[0], "pairs")


def test_dataset_names_and_uncapped_runs(analyze_runs, tmp_path):
    run = tmp_path / "f30k"
    shutil.copytree(analyze_runs / "ts0", run)
    for f in run.glob("*.json"):  # as a run on real Flickr30k Entities shards over the whole split would record
        res = json.loads(f.read_text())
        if "skipped" in res:  # modality/i2t on a two-stream backbone: "Not run", no numbers
            continue
        res["data"].update(dataset="flickr30k_entities", synthetic=False)
        res["max_samples"] = None
        f.write_text(json.dumps(res))
    T = _tables([run / "analysis.json"], "table1,table2")
    assert T["table1"].rows == ["TS untrained / Flickr30k"] and T["table1"].note.count("Not a result") == 0
    assert T["table2"].rows[0] == "TS untrained: people"  # Flickr30k is Table 2's own dataset


def test_runs_written_before_max_samples_was_recorded_are_marked_cap_unknown(analyze_runs, tmp_path):
    """Analyze outputs from before ``max_samples`` was recorded (neither the files nor ``analysis.json`` have it) are
    not taken for uncapped runs: a "cap unknown" note under each table names their files. A run recording
    ``max_samples: null`` (the whole split) is not marked."""
    old, new = tmp_path / "old" / "ts0", tmp_path / "new" / "ts0"
    for d in (old, new):
        shutil.copytree(analyze_runs / "ts0", d)
        for f in d.glob("*.json"):
            res = json.loads(f.read_text())
            res.get("data", {}).update(dataset="flickr30k_entities", synthetic=False)
            res.get("data", {}).pop("split_samples", None)  # nor was the split's size recorded then
            res.pop("max_samples", None) if d == old else res.update(max_samples=None)
            f.write_text(json.dumps(res))
    T = _tables([old], "table1,table2")
    for t in T.values():
        assert "**Cap unknown:** 1 of the 1 analyze runs were written before analyze recorded max_samples" in t.note
        assert str(old / ("fusion.json" if t.name == "table1" else "coref.json")) in t.note, t.note
        assert "Not a result" not in t.note
    T = _tables([new], "table1")
    assert "Cap unknown" not in T["table1"].note and "Not a result" not in T["table1"].note


def test_paper_sweep_config_composes():
    # docs/reproducing.md's $P (the train experiments' paths) is accepted as it is
    P = ["paths.flickr30k=/data/f30k", "paths.vg=/data/vg", "paths.vg_mismatch=/data/vgm", "paths.senteval=/data/se",
         "paths.backbones.lxmert.checkpoint=/c/model_LXRT.pth", "paths.backbones.lxmert.tokenizer=/c/tok",
         "paths.backbones.bert.path=/c/bert"]
    cfg = compose(["analyze_experiment=paper", "backbone=lxmert", "dataset_key=vg", *P], "analyze")
    assert cfg.data.root == "/data/vg" and cfg.data.name == "shards"
    assert cfg.backbone.checkpoint == "/c/model_LXRT.pth" and cfg.backbone.tokenizer == "/c/tok"
    assert list(cfg.analysis.run) == ["fusion", "modality", "i2t", "coref", "relation", "tsne"]
    assert compose(["analyze_experiment=paper", *P], "analyze").data.root == "/data/f30k"  # the default dataset_key


def test_an_analyze_sweep_reports_its_tables_when_it_ends(analyze_runs, capsys):
    """``configs/analyze.yaml`` has the same end-of-sweep report as training sweeps: the analysis tables of the
    sweep's runs go to ``<sweep dir>/report``."""
    from omegaconf import OmegaConf

    from value_pl.callbacks import SweepReport

    from conftest import CONFIGS

    cb = OmegaConf.load(CONFIGS / "analyze.yaml").hydra.callbacks.sweep_report
    assert cb._target_ == "value_pl.callbacks.SweepReport"
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(analyze_runs)}}, "logger": {"name": "none"}})
    out = SweepReport(layout=cb.layout).report(cfg)
    assert out["runs"] == 3 and {"table1", "table2", "table4", "table7"} <= set(out["tables"])
    md = (analyze_runs / "report" / "report.md").read_text()
    assert "Table 1: multimodal fusion degree" in md and "sweep report: 3 runs" in capsys.readouterr().out
    shutil.rmtree(analyze_runs / "report")  # the module's other tests read the sweep directory


def test_seeds_drawn_with_other_rand_baselines_are_not_mixed(analyze_runs, tmp_path):
    """``rand_iou`` (which regions a Rand. baseline may draw) and ``coref_label`` are recorded with every analysis:
    a seed drawn with other values is refused in the seed's cell; files written before they were recorded are not
    compared on them."""
    coref = _load(analyze_runs / "ss0", "coref")
    assert coref["rand_iou"] == 0.5 and coref["coref_label"] == "coref"
    assert _load(analyze_runs / "ss0", "analysis")["rand_iou"] == 0.5
    run = tmp_path / "s" / "ss2"
    shutil.copytree(analyze_runs / "ss0", run)
    for f in run.glob("*.json"):
        res = json.loads(f.read_text())
        res["seed"], res["rand_iou"] = 2, None
        f.write_text(json.dumps(res))
    with pytest.raises(ValueError, match="differ in rand_iou 0.5 vs None"):
        _tables([analyze_runs, tmp_path / "s"], "table2")
    for f in run.glob("*.json"):  # as written before it was recorded
        res = json.loads(f.read_text())
        res.pop("rand_iou"), res.pop("coref_label")
        f.write_text(json.dumps(res))
    assert "table2" in _tables([analyze_runs, tmp_path / "s"], "table2")
