"""value_pl.report on synthetic run directories: means, 95% t intervals, paper layouts, CSV/markdown."""
import csv
import json
import math

import pytest

from value_pl import report
from value_pl.report.__main__ import main as report_main
from value_pl.report.collect import _T975


def write_run(root, name, task, prober, family, seed, layers, pretrained=True, control=False, mismatch=False,
              chance=0.5, mdl=None):
    d = root / name
    d.mkdir(parents=True)
    res = {"task": task, "prober": prober, "seed": seed, "control": control, "chance": chance,
           "backbone": {"family": family, "name": family, "pretrained": pretrained},
           "data": {"root": f"/x/{'vg_mismatch' if mismatch else 'vg'}", "dataset": "d", "mismatch": mismatch},
           "layers": [{"layer": -1, "name": n, "val_acc": a, "test_acc": a, **(extra or {})}
                      for n, a, extra in [(n, a, (mdl or {}).get(n)) for n, a in layers.items()]]}
    if mdl:
        res["mdl"] = {"layers": mdl}
    (d / "results.json").write_text(json.dumps(res))
    return d


ACCS = [0.50, 0.60, 0.70]


@pytest.fixture
def runs(tmp_path):
    for s, a in enumerate(ACCS):
        for fam in ("uniter", "lxmert"):
            for task in ("vcd", "vcc"):
                write_run(tmp_path, f"{fam}-{task}-emb-{s}", task, "layer_emb", fam, s,
                          {"layer_01": a, "layer_05": a + 0.1, "layer_07": a})
                write_run(tmp_path, f"{fam}-{task}-att-{s}", task, "attention", fam, s, {"all_heads": a / 2})
            for task in ("vri", "vrc"):
                for mis in (False, True):
                    write_run(tmp_path, f"{fam}-{task}-{mis}-{s}", task, "layer_emb", fam, s,
                              {"raw": 0.3, "layer_01": a - (0.2 if mis else 0)}, mismatch=mis)
                write_run(tmp_path, f"{fam}-{task}-ctrl-{s}", task, "layer_emb", fam, s,
                          {"raw": 0.25, "layer_01": 0.2 + 0.01 * s}, control=True)
        for fam in ("uniter", "lxmert", "bert"):
            for task in ("sentlen", "tense"):
                write_run(tmp_path, f"{fam}-{task}-{s}", task, "senteval_mlp", fam, s,
                          {"layer_00": 0.2, "layer_03": a, "layer_09": a - 0.05})
        write_run(tmp_path, f"mdl-{s}", "vrc", "layer_emb", "uniter", s, {"layer_01": a},
                  mdl={"layer_01": {"codelength_bits": 1000.0 * (s + 1), "compression": 2.0}})
    return tmp_path


def test_stat_mean_and_t_interval():
    s = report.Stat(ACCS)
    assert s.mean == pytest.approx(0.6)
    # sd = 0.1, t_{0.975,2} = 4.3027 -> half-width 4.3027 * 0.1 / sqrt(3)
    assert s.ci95 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-4)
    assert report.Stat([0.5]).fmt() == "50.00" and math.isnan(report.Stat([0.5]).ci95)
    assert s.fmt() == "60.00 ± 24.84"
    assert report.t975(1) == pytest.approx(12.706, abs=1e-3) and report.t975(100) == pytest.approx(1.984, abs=1e-3)
    assert _T975[29] == pytest.approx(report.t975(30), abs=1e-3)


def test_layouts(runs, tmp_path):
    tables = {t.name: t for t in report.build_tables(report.load_runs([runs]), "auto")}
    t3 = tables["table3"]
    assert t3.cols == ["VCD (SS)", "VCD (TS)", "VCC (SS)", "VCC (TS)"]
    assert t3.rows == ["All attention heads", "Random guess", "Layer 1", "Layer 5"]  # table3 keeps 1, 5, 12
    assert t3.cells[("Layer 5", "VCC (TS)")].mean == pytest.approx(0.7)
    assert t3.cells[("All attention heads", "VCD (SS)")].mean == pytest.approx(0.3)
    assert t3.text("Random guess", "VCD (SS)") == "50.00"
    assert "Layer 7" in tables["table8"].rows
    t9 = tables["table9"]
    assert t9.cols == ["VRI (SS)", "VRC (SS)", "VRI (SS mis.)", "VRC (SS mis.)"]
    assert t9.rows[0] == "Original visual emb."
    assert t9.cells[("Layer 1", "VRI (SS mis.)")].mean == pytest.approx(0.4)
    assert "table10" in tables and tables["table10"].cols[0] == "VRI (TS)"
    t5 = tables["table5"]
    assert t5.rows == ["SS", "TS", "BERT"] and t5.cols == ["SentLen", "Tense"]
    assert t5.text("BERT", "SentLen") == "60.00 ± 24.84 (L3)"
    t11 = tables["table11"]
    assert t11.rows == ["Embeddings", "Layer 3", "Layer 9"] and "SentLen (TS)" in t11.cols
    assert "cross-modality layers, numbered 0-4 in the paper's Table 1" in tables["table10"].note
    assert "Layer k = cross layer k-1" in t3.note and "language layers" in t11.note
    sel = tables["selectivity"]
    row = "VRI / layer_emb / SS / Layer 1"
    # per-seed selectivity = a_s - (0.2 + 0.01 s): 0.30, 0.39, 0.48
    assert sel.cells[(row, "selectivity")].values == pytest.approx([0.30, 0.39, 0.48])
    assert sel.cells[(row, "control accuracy")].mean == pytest.approx(0.21)
    m = tables["mdl"]
    assert m.cells[("VRC / layer_emb / SS / Layer 1", "codelength (kbits)")].mean == pytest.approx(2.0)


def test_cli_writes_markdown_and_csv(runs, tmp_path):
    out = tmp_path / "rep"
    assert report_main([str(runs), "--layout", "table3,table9,table5", "--out", str(out)]) == 0
    md = (out / "report-table3-table9-table5.md").read_text()
    assert "Table 3" in md and "| Layer 5 |" in md and "± " in md
    rows = list(csv.DictReader(open(out / "table3.csv")))
    r = next(x for x in rows if x["row"] == "Layer 1" and x["column"] == "VCD (SS)")
    assert float(r["mean"]) == pytest.approx(60.0) and float(r["ci95"]) == pytest.approx(24.84, abs=0.01)
    assert r["n"] == "3" and r["values"] == "50 60 70"
    assert (out / "table9.csv").exists() and (out / "table5.csv").exists()


def test_reports_of_two_layouts_on_one_directory_both_stay(runs, capsys):
    """``--layout table3`` then ``--layout table8`` on one directory (default --out): two markdown files, each
    with its table; ``auto`` writes report.md (what the sweep callback writes) and leaves them be."""
    assert report.report_name("auto") == "report.md" and report.report_name("table3,table8") == "report-table3-table8.md"
    assert report_main([str(runs), "--layout", "table3"]) == 0
    assert report_main([str(runs), "--layout", "table8"]) == 0
    out = runs / "report"
    t3, t8 = (out / "report-table3.md").read_text(), (out / "report-table8.md").read_text()
    assert "Table 3" in t3 and "Table 8" not in t3 and "| Layer 7 |" not in t3
    assert "Table 8" in t8 and "Table 3" not in t8 and "| Layer 7 |" in t8
    assert f"wrote {out / 'report-table8.md'}" in capsys.readouterr().out
    assert not (out / "report.md").exists()
    assert report_main([str(runs)]) == 0
    assert {p.name for p in out.glob("*.md")} == {"report.md", "report-table3.md", "report-table8.md"}
    assert "Table 3" in (out / "report.md").read_text() and (out / "report-table3.md").read_text() == t3
    assert (out / "table3.csv").exists() and (out / "table8.csv").exists()


def test_wandb_tables(runs, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    logged, inits = {}, []

    class FakeRun:
        summary: dict = {}

        def log(self, d):
            logged.update(d)

        def finish(self):
            logged["finished"] = True

    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or FakeRun())
    report.log_wandb(report.build_tables(report.load_runs([runs]), "table3"), group="table3-sweep")
    assert "report/table3" in logged and logged["finished"]
    assert inits[0]["group"] == "table3-sweep" and inits[0]["job_type"] == "report"
    # the summary holds the table: every measured cell (in %) and the markdown
    assert "table3/markdown" in FakeRun.summary
    cells = {k: v for k, v in FakeRun.summary.items() if k.startswith("table3/") and isinstance(v, float)}
    assert cells and all(0 <= v <= 100 for v in cells.values())


def test_table5_numbers_reach_the_csv_and_the_wandb_summary(runs, tmp_path):
    """Table 5's cells are numbers with their chosen layer, not only text: the CSV has mean/ci95/n/values and the
    W&B summary the mean and the layer, as for every other table."""
    assert report_main([str(runs), "--layout", "table5", "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "table5.csv") as f:
        rows = {(r["row"], r["column"]): r for r in csv.DictReader(f)}
    bert = rows[("BERT", "SentLen")]
    assert float(bert["mean"]) == pytest.approx(60.0) and int(bert["n"]) == 3 and float(bert["ci95"]) > 0
    assert bert["text"] == "60.00 ± 24.84 (L3)" and bert["values"].split() == ["50", "60", "70"]
    s = report.summary_cells(report.build_tables(report.load_runs([runs]), "table5"))
    assert s["table5/BERT/SentLen"] == pytest.approx(60.0) and s["table5/BERT/SentLen/layer"] == "L3"
    assert s["table5/TS/Tense/n"] == 3


def test_table5_selects_the_layer_on_dev_not_test(tmp_path):
    """Layer 3 is best on dev, layer 9 on test: Table 5 reports layer 3's test accuracy, labelled L3."""
    for seed in range(2):
        d = write_run(tmp_path, f"bert-{seed}", "sentlen", "senteval_mlp", "bert", seed, {})
        res = json.loads((d / "results.json").read_text())
        res["layers"] = [{"layer": 0, "name": "layer_00", "val_acc": 0.90, "test_acc": 0.10},
                         {"layer": 3, "name": "layer_03", "val_acc": 0.80 + 0.01 * seed, "test_acc": 0.60},
                         {"layer": 9, "name": "layer_09", "val_acc": 0.70, "test_acc": 0.95}]
        res["layers"][0]["val_acc"] = 0.95  # embeddings: best on dev, but not a layer the paper chooses from
        (d / "results.json").write_text(json.dumps(res))
    (t5,) = report.build_tables(report.load_runs([tmp_path]), "table5")
    assert t5.text("BERT", "SentLen") == "60.00 ± 0.00 (L3)"
    assert "best dev accuracy" in t5.title and "dev (validation) accuracy" in t5.note


def _run(tmp_path, name, seed=0, family="uniter", acc=0.75, **extra):
    d = write_run(tmp_path, name, "vcc", "attention", family, seed, {"all_heads": acc})
    res = json.loads((d / "results.json").read_text())
    res.update(extra)
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_shuffled_label_and_derived_data_runs_are_their_own_rows(tmp_path):
    """A shuffled-label sanity run at the same seed neither replaces the real run in Table 3 nor is averaged with
    it; SentEval-style tasks derived from captions are not SentEval's data and get their own row in Table 5."""
    _run(tmp_path, "real", acc=0.75)
    _run(tmp_path, "shuffled", acc=0.20, shuffle_labels=True)
    for seed, (dataset, acc) in enumerate([("senteval", 0.96), ("derived_sentlen", 0.70)]):
        d = write_run(tmp_path, f"bert-{dataset}", "sentlen", "senteval_mlp", "bert", seed, {"layer_03": acc})
        res = json.loads((d / "results.json").read_text())
        res["data"]["dataset"] = dataset
        (d / "results.json").write_text(json.dumps(res))
    runs = report.load_runs([tmp_path])
    (t3,) = report.build_tables(runs, "table3")
    assert t3.text("All attention heads", "VCC (SS)") == "75.00"
    assert report.Runs(runs).stat("vcc", "attention", "SS shuffled labels", "all_heads").values == [0.20]
    (t5,) = report.build_tables(runs, "table5")
    assert t5.text("BERT", "SentLen") == "96.00 (L3)" and t5.text("BERT derived data", "SentLen") == "70.00 (L3)"


def test_runs_that_would_overwrite_or_mix_models_are_refused(tmp_path):
    a = _run(tmp_path / "a", "uniter-0", acc=0.75)
    b = _run(tmp_path / "b", "uniter-0-again", acc=0.70)
    with pytest.raises(ValueError, match=r"same configuration \(vcc / attention / SS\) with the same seed 0") as e:
        report.Runs(report.load_runs([tmp_path]))
    assert str(a / "results.json") in str(e.value) and str(b / "results.json") in str(e.value)
    # VisualBERT is single-stream too: its seed 1 would be averaged with UNITER's seed 0
    c = tmp_path / "c"
    _run(c, "uniter", seed=0)
    _run(c, "visualbert", seed=1, family="visualbert")
    with pytest.raises(ValueError, match="different backbones share the model label 'SS'.*visualbert"):
        report.Runs(report.load_runs([c]))
    # two checkpoints of one model family (checksums differ)
    d = tmp_path / "d"
    for seed, checksum in enumerate(["aaa", "bbb"]):
        r = _run(d, f"ckpt-{seed}", seed=seed)
        res = json.loads((r / "results.json").read_text())
        res["backbone"]["checksum"] = checksum
        (r / "results.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match="checksum aaa.*checksum bbb|checksum bbb.*checksum aaa"):
        report.Runs(report.load_runs([d]))


def _trained(d, name, seed, **training):
    r = _run(d, name, seed=seed)
    res = json.loads((r / "results.json").read_text())
    res["training"] = {"max_epochs": 10, "fast_dev_run": False, "limit_train_batches": None, "limit_val_batches": None,
                       "limit_test_batches": None, "train_batches": None, "batch_size": 32, "world_size": 1,
                       "lr": 0.001, "weight_decay": 0.0, "precision": "32", **training}
    (r / "results.json").write_text(json.dumps(res))
    return r / "results.json"


def test_seeds_trained_differently_are_refused_and_smoke_tests_marked(tmp_path):
    """The seeds of a cell differ only in their seed: a run trained for 6 epochs (trainer=cpu) is not averaged with
    runs of 10, and a smoke test (fast_dev_run, capped batches) is marked under every table it reaches."""
    a = _trained(tmp_path / "a", "s0", 0)
    b = _trained(tmp_path / "a", "s1", 1, max_epochs=6)
    with pytest.raises(ValueError, match=r"trained differently \(max_epochs 10 vs 6\)") as e:
        report.Runs(report.load_runs([tmp_path / "a"]))
    assert str(a) in str(e.value) and str(b) in str(e.value)
    # precision is recorded but not refused (bf16 heads on a GPU, float32 on the CPU); results without a record
    # (written before runs kept one) are not compared
    _trained(tmp_path / "p", "s0", 0)
    _trained(tmp_path / "p", "s1", 1, precision="bf16-mixed")
    _run(tmp_path / "p", "old", seed=2)
    assert not report.Runs(report.load_runs([tmp_path / "p"])).smoke
    # smoke tests: the note under every table of the report
    for i, smoke in enumerate([{"fast_dev_run": True}, {"train_batches": 2}, {"limit_val_batches": 0.5}]):
        _trained(tmp_path / f"q{i}", "s0", 0, **smoke)
        (t,) = report.build_tables(report.load_runs([tmp_path / f"q{i}"]), "table3")
        assert "**Not a result:** 1 of the 1 runs are smoke tests" in t.markdown()
    _trained(tmp_path / "full", "s0", 0, limit_val_batches=1.0)
    (t,) = report.build_tables(report.load_runs([tmp_path / "full"]), "table3")
    assert "Not a result" not in t.markdown()


def _with_data(d, name, seed, **data):
    r = _run(d, name, seed=seed)
    res = json.loads((r / "results.json").read_text())
    res["data"] = {"root": "/x/f30k", "dataset": "flickr30k_entities", "mismatch": False, **data}
    (r / "results.json").write_text(json.dumps(res))
    return r / "results.json"


def test_seeds_on_different_data_are_refused_and_demo_runs_marked(tmp_path):
    """A cell is one model on one dataset: a seed run on the demo shards (or another dataset) is not averaged with
    runs on Flickr30k Entities, and runs on synthetic demo shards are marked under every table they reach, as the
    analyses' reports mark theirs."""
    a = _with_data(tmp_path / "a", "s0", 0)
    b = _with_data(tmp_path / "a", "s1", 1, dataset="demo", synthetic=True, root="shards/demo")
    with pytest.raises(ValueError, match=r"read different data \(dataset 'flickr30k_entities' vs 'demo' "
                                         r"\(synthetic\)\)") as e:
        report.Runs(report.load_runs([tmp_path / "a"]))
    assert str(a) in str(e.value) and str(b) in str(e.value)
    # the same dataset built at another path (another machine) is one dataset
    _with_data(tmp_path / "b", "s0", 0)
    _with_data(tmp_path / "b", "s1", 1, root="/elsewhere/f30k")
    (t,) = report.build_tables(report.load_runs([tmp_path / "b"]), "table3")
    assert "Not a result" not in t.markdown()
    _with_data(tmp_path / "c", "s0", 0, dataset="demo", synthetic=True)
    (t,) = report.build_tables(report.load_runs([tmp_path / "c"]), "table3")
    assert "**Not a result:** 1 of the 1 runs read synthetic demo shards" in t.markdown()
