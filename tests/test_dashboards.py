"""What W&B shows, read back from the offline run files (``tests/wandb_files.py``; no account, no network).

* a probing run: per-step curves and one "accuracy by layer" chart (val, test, chance, majority);
* a SentEval run and an MDL run (drivers outside Lightning): the same results table (with the selected
  configuration / the codelengths), chart and summary;
* a control-task run: control accuracy and, with the matching task run beside it, selectivity; without it,
  control accuracy and a note saying selectivity is not available;
* ``python -m value_pl.compare``: every metric against the checkpoint's training step, one line chart per
  summary metric;
* a multirun (``-m``): every job in one W&B group, plus a ``report`` run in that group whose summary holds
  the paper's table (the ``SweepReport`` Hydra callback).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, compose
from wandb_files import offline_runs

SHORT = ["logger=wandb", "trainer.enable_progress_bar=false", "prober=layer_emb", "task=vcc", "layers=[0,1,2]",
         "data.train_batches=2", "trainer.max_epochs=1", "++trainer.limit_val_batches=2",
         "++trainer.limit_test_batches=2", "++trainer.log_every_n_steps=1"]


def run_train(root, name, demo_root, extra=()):
    from value_pl.driver.train import train

    rdir = root / name
    train(compose([f"data.root={demo_root}", *SHORT, f"run_dir={rdir}", *extra]))
    (run,) = offline_runs(rdir)
    return rdir, json.loads((rdir / "results.json").read_text()), run


def series(chart: dict) -> dict[str, list]:
    """Long-format line-series table (step = layer, lineKey, lineVal) -> {line: [values by layer]}."""
    t = chart["table"]
    i, k, v = (t["columns"].index(c) for c in ("step", "lineKey", "lineVal"))
    out: dict[str, list] = {}
    for row in sorted(t["data"], key=lambda r: r[i]):
        out.setdefault(row[k], []).append(row[v])
    return out


def close(a, b):
    return all(math.isclose(x, y, abs_tol=1e-9) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, demo_root):
    """A task run and its control run side by side (like the selectivity experiment's sweep directory)."""
    root = tmp_path_factory.mktemp("sweep")
    task = run_train(root, "0-task", demo_root)
    control = run_train(root, "1-control", demo_root, ["control=true"])
    return root, task, control


def test_probing_run_accuracy_by_layer(sweep):
    _, (_, res, run), _ = sweep
    assert [h for h in run.history if "val/acc/layer_01" in h] and [h for h in run.history if "train/loss" in h]
    chart = run.chart("accuracy_by_layer")
    assert chart["title"] == "accuracy by layer" and chart["xname"] == "layer"
    lines = series(chart)
    assert set(lines) == {"val", "test", "chance", "majority"}
    rows = sorted(res["layers"], key=lambda r: r["layer"])
    assert close(lines["val"], [r["val_acc"] for r in rows]) and close(lines["test"], [r["test_acc"] for r in rows])
    assert close(lines["chance"], [res["chance"]] * 3) and close(lines["majority"], [res["majority"]] * 3)
    assert run.summary["best/layer"] == res["best"]["name"] and run.summary["control"] is False
    assert run.column("results", "name") == [r["name"] for r in res["layers"]]
    # the summary's validation accuracy is the one each test number was selected at (results.json), not the last
    # epoch's left by the logged curve
    for r in res["layers"]:
        assert math.isclose(run.summary[f"val/acc/{r['name']}"], r["val_acc"])
        assert math.isclose(run.summary[f"val_acc/{r['name']}"], r["val_acc"])
        assert math.isclose(run.summary[f"test_acc/{r['name']}"], r["test_acc"])


def test_control_run_shows_selectivity(sweep):
    _, (_, task, _), (_, ctrl, run) = sweep
    lines = series(run.chart("accuracy_by_layer"))
    assert set(lines) == {"control val", "control test", "chance", "majority", "task test", "selectivity"}
    t = [r["test_acc"] for r in sorted(task["layers"], key=lambda r: r["layer"])]
    c = [r["test_acc"] for r in sorted(ctrl["layers"], key=lambda r: r["layer"])]
    assert close(lines["task test"], t) and close(lines["control test"], c)
    assert close(lines["selectivity"], [a - b for a, b in zip(t, c)])
    assert run.summary["selectivity/available"] is True
    assert math.isclose(run.summary["selectivity/layer_01"], t[1] - c[1])
    assert "task" in run.chart("accuracy_by_layer")["title"]


def test_control_run_without_task_run_says_so(sweep, tmp_path, capsys):
    """The same control results logged from a directory with no task run beside it."""
    from value_pl.driver.results import log_results_table
    from value_pl.driver.setup import close_logger, make_logger

    _, _, (_, ctrl, _) = sweep
    cfg = compose(["logger=wandb", f"run_dir={tmp_path / 'alone'}"])
    rdir = tmp_path / "alone"
    logger = make_logger(cfg, rdir)
    log_results_table(logger, ctrl, rdir)
    close_logger(logger, cfg)
    assert "selectivity not available" in capsys.readouterr().out
    (run,) = offline_runs(rdir)
    chart = run.chart("accuracy_by_layer")
    assert set(series(chart)) == {"control val", "control test", "chance", "majority"}
    assert "no matching task run" in chart["title"]
    assert run.summary["selectivity/available"] is False and "not available" in run.summary["selectivity/note"]


def test_senteval_and_mdl_runs_log_to_wandb(tmp_path):
    """The drivers that train heads outside Lightning log one W&B run each, as a Lightning run does."""
    from tasks_helpers import FAST_DATA, one_thread, sentence_shards, tiny_backbones

    from value_pl.driver.train import train

    root = sentence_shards(tmp_path / "sent", n=(48, 16, 16))
    common = ["task=sentlen", f"data.root={root}", *tiny_backbones(tmp_path / "bb")["BERT"], "logger=wandb",
              "progress=false", "trainer.enable_progress_bar=false", *FAST_DATA]
    jobs = {"senteval": ["prober=senteval_lr", "prober.max_epoch=1", "prober.epoch_size=1"],
            "mdl": ["prober=layer_emb", "mdl=true", "mdl_opts.max_epochs=1", "mdl_opts.fractions=[0.5,1.0]"]}
    with one_thread():
        out = {k: train(compose([*common, *o, f"run_dir={tmp_path / k}"])) for k, o in jobs.items()}
    for kind, res in out.items():
        rdir = tmp_path / kind
        assert json.loads((rdir / "results.json").read_text())["task"] == "sentlen"
        (run,) = offline_runs(rdir)
        names = [r["name"] for r in res["layers"]]
        assert names == ["layer_00", "layer_01", "layer_02"]
        assert run.column("results", "name") == names
        assert close(run.column("results", "test_acc"), [r["test_acc"] for r in res["layers"]])
        lines = series(run.chart("accuracy_by_layer"))
        assert set(lines) == {"val", "test", "chance", "majority"}
        assert close(lines["val"], [r["val_acc"] for r in res["layers"]])
        assert run.summary["best/layer"] == res["best"]["name"] and run.summary["control"] is False
        assert math.isclose(run.summary["test_acc/layer_01"], res["layers"][1]["test_acc"])
        assert run.config["task"]["name"] == "sentlen"
    se = offline_runs(tmp_path / "senteval")[0]
    assert se.column("results", "nhid") == [0, 0, 0] and se.column("results", "passes") == \
        [r["passes"] for r in out["senteval"]["layers"]]
    md = offline_runs(tmp_path / "mdl")[0]
    assert close(md.column("results", "codelength_bits"), [r["codelength_bits"] for r in out["mdl"]["layers"]])
    assert math.isclose(md.summary["mdl/compression/layer_02"], out["mdl"]["layers"][2]["compression"])


def test_compare_charts_metrics_against_the_step(tmp_path):
    from value_pl.compare.driver import log_rows
    from value_pl.driver.setup import close_logger, make_logger

    rows = [{"checkpoint": f"/c/ckpt_step{s}.pt", "step": s,
             "metrics": {"fusion/nmi/mean": n, "vrc/acc/best": b, "vrc/acc/layer_01": a}}
            for s, n, b, a in [(30, 0.1, 0.5, 0.4), (200, 0.2, 0.6, 0.5), (1000, 0.3, 0.7, 0.6)]]
    cfg = compose(["logger=wandb", f"run_dir={tmp_path}"], "compare")
    logger = make_logger(cfg, tmp_path)
    log_rows(logger, rows)
    close_logger(logger, cfg)
    (run,) = offline_runs(tmp_path)
    pts = [(h["compare/step"], h["vrc/acc/best"], h["vrc/acc/layer_01"]) for h in run.history if "compare/step" in h]
    assert pts == [(30, 0.5, 0.4), (200, 0.6, 0.5), (1000, 0.7, 0.6)]
    assert run.step_metrics["vrc/acc/best"] == "compare/step" and run.step_metrics["fusion/nmi/mean"] == "compare/step"
    chart = run.chart("compare/chart/vrc/acc/best")
    assert chart["x"] == "step" and chart["y"] == "vrc/acc/best" and "training step" in chart["title"]
    assert chart["table"]["data"] == [[30, 0.5], [200, 0.6], [1000, 0.7]]
    assert "compare/chart/vrc/acc/layer_01" not in run.config["_wandb"]["visualize"]  # per layer: curves only
    assert run.column("compare/rows", "step") == [30, 200, 1000]


@pytest.mark.slow
def test_multirun_logs_into_one_group_with_the_report(tmp_path, demo_root):
    """``python -m value_pl.train -m ...``: two jobs in one group; the report run's summary holds table 3's cells."""
    sweep = tmp_path / "multirun" / "mytable" / "2024-01-01_00-00-00"
    cmd = [sys.executable, "-m", "value_pl.train", "-m", "prober=attention,layer_emb", "task=vcd", "layers=[1]",
           f"data.root={demo_root}", "logger=wandb", "trainer.enable_progress_bar=false", "data.train_batches=2",
           "trainer.max_epochs=1", "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1",
           f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    runs = offline_runs(sweep)
    group = "mytable-2024-01-01_00-00-00"
    assert {r.group for r in runs} == {group} and len(runs) == 3
    jobs = [r for r in runs if r.job_type != "report"]
    assert sorted(r.name for r in jobs) == ["0", "1"]
    (rep,) = [r for r in runs if r.job_type == "report"]
    assert rep.name == f"{group}-report" and "Table 3" in rep.summary["table3/markdown"]
    res = [json.loads((sweep / n / "results.json").read_text()) for n in ("0", "1")]
    emb = next(r for r in res if r["prober"] == "layer_emb")
    assert math.isclose(rep.summary["table3/Layer 1/VCD (SS)"], 100 * emb["layers"][0]["test_acc"])
    assert {"Random guess", "Layer 1"} <= set(rep.column("report/table3", "row"))
    assert (sweep / "report" / "report.md").exists() and f"W&B group {group}" in p.stdout


def test_sweep_report_with_no_runs_says_so(tmp_path, caplog):
    """A sweep whose jobs wrote no results.json under its directory (failed, or run_dir elsewhere) is said, not
    passed over in silence."""
    import logging

    from omegaconf import OmegaConf

    from value_pl.callbacks import SweepReport

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}, "logger": {"name": "none"}})
    (tmp_path / "sweep").mkdir()
    with caplog.at_level(logging.WARNING, logger="value_pl"):
        assert SweepReport().report(cfg) is None
    assert "no results.json or analyze output under" in caplog.text and "run_dir" in caplog.text
