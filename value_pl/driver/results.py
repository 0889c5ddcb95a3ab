"""A run's ``results.json`` / ``results.md`` and the results table for the logger."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig

from ..data.cache import backbone_config
from ..data.datamodule import ShardDataModule
from ..probers.metrics import majority_baseline
from ..probers.module import ProbeModule
from ..protocols.control import control_info

log = logging.getLogger("value_pl")
#: rows that are controls, not layers: reported beside the layers, never chosen as the run's best layer
CONTROLS = ("raw", "boxes")


def backbone_record(backbone) -> dict:
    """What a run's output says of its backbone: its identity (weights checksum, ``config_sha256``, ...) and
    ``model_config``, the effective model config that hash is of (so that python -m value_pl.report can name the
    fields in which two runs' backbones differ)."""
    return {**backbone.describe(), "model_config": backbone_config(backbone)}


def best_layer(rows: list[dict]) -> dict | None:
    """The row with the best validation accuracy among the layers: a control row (the raw region features,
    ``raw_baseline``; the boxes alone, ``geometry_baseline``) is reported beside them but is no candidate."""
    finite = [r for r in rows if _num(r.get("test_acc")) and _num(r.get("val_acc")) and r.get("name") not in CONTROLS]
    return max(finite, key=lambda r: r["val_acc"]) if finite else None


def results_dict(cfg: DictConfig, module: ProbeModule, dm: ShardDataModule, extra: dict | None = None,
                 rows: list[dict] | None = None, counts: dict[str, dict[str, int] | None] | None = None,
                 label_counts: dict[str, list[int]] | None = None) -> dict:
    """The ``results.json`` of a run; drivers that train heads outside Lightning (MDL, SentEval) pass their
    own per-layer ``rows``, ``counts``: per split, the collator's counters summed over the one pass that read
    it (:func:`~value_pl.protocols.fitting.extract_split`; ``None``: split not read), reported as the Lightning
    loop reports its last epoch's (``pairs_dropped``, ``pairs_evaluated``, ``samples_seen``, ``truncated``), and
    ``label_counts``: per split, how often each label (in label order) occurred in what they trained and
    tested on (for the majority baseline)."""
    rows = module.layer_rows() if rows is None else rows
    seen = module.seen if counts is None else {s: ([c] if c is not None else []) for s, c in counts.items()}
    best_by_val = best_layer(rows)
    res = {
        "task": module.task["name"],
        "prober": module.prober_name,
        "backbone": backbone_record(module.backbone),
        "data": {"root": str(dm.root), "dataset": dm.manifest.get("dataset"),
                 "synthetic": bool(dm.manifest.get("synthetic", False)),
                 "mismatch": bool(dm.manifest.get("mismatch", False))
                 or "mismatch" in f"{dm.root.name} {dm.manifest.get('dataset')}"},
        "seed": int(cfg.seed),
        "control": control_info(cfg, dm, module.task["name"]),
        "shuffle_labels": bool(cfg.get("shuffle_labels", False)),
        "num_classes": len(module.labels),
        "labels": module.labels,
        "chance": 1.0 / len(module.labels),
        "majority": majority(cfg, module, dm, label_counts),
        "layers": rows,
        "best": ({"layer": best_by_val["layer"], "name": best_by_val["name"], "test_acc": best_by_val["test_acc"],
                  "val_acc": best_by_val["val_acc"]} if best_by_val else None),
        # per split, one pass (the last epoch), summed over ranks; drivers outside Lightning pass their own
        "pairs_dropped": {s: (c[-1]["pairs_dropped"] if c else None) for s, c in seen.items()},
        # pairs in val/test metrics, summed over ranks (== the manifest's count: each sample exactly once)
        "pairs_evaluated": {s: c[-1]["pairs"] for s, c in seen.items() if c and s != "train"},
        "samples_seen": {s: [e["samples"] for e in c] for s, c in seen.items() if c},
        "truncated": truncation(module, seen),
    }
    if extra:
        res.update(extra)
    return res


def training_record(cfg: DictConfig, world_size: int = 1) -> dict:
    """How the heads of a Lightning run were trained: the budget (epochs, smoke-test switches, batch caps), batch
    size, world size, optimiser settings and precision. The report refuses to average seeds trained differently and
    marks smoke tests (:func:`value_pl.report.collect.run_budget`)."""
    t, d, o = cfg.trainer, cfg.data, cfg.get("optim") or {}
    fdr = t.get("fast_dev_run", False)
    return {"max_epochs": t.get("max_epochs"), "fast_dev_run": fdr if isinstance(fdr, (bool, int)) else bool(fdr),
            **{k: t.get(k) for k in ("limit_train_batches", "limit_val_batches", "limit_test_batches")},
            "train_batches": d.get("train_batches"), "batch_size": d.get("batch_size"), "world_size": int(world_size),
            "lr": o.get("lr"), "weight_decay": o.get("weight_decay"), "precision": str(t.get("precision", "32"))}


def majority(cfg: DictConfig, module: ProbeModule, dm: ShardDataModule, label_counts: dict | None = None):
    """The majority-class baseline: test accuracy of always predicting the most frequent training label.

    From the labels the run actually trained and tested on (``label_counts``, else what the probe module counted),
    so a control task's or shuffled-label run's baseline is that of its own labels; without those, from the
    manifest's label counts for a run whose labels are the task's own, and ``None`` for a relabelled one."""
    seen = label_counts if label_counts is not None else getattr(module, "label_counts", {})
    if seen.get("train") and seen.get("test"):
        return majority_baseline(seen["train"], seen["test"])
    if cfg.get("control", False) or cfg.get("shuffle_labels", False):
        return None
    task = module.task["name"]
    train, test = dm.label_counts(task, "train"), dm.label_counts(task, "test")
    return majority_baseline([train.get(l, 0) for l in module.labels], [test.get(l, 0) for l in module.labels])


def _num(x) -> bool:
    return isinstance(x, (int, float)) and x == x


def truncation(module: ProbeModule, seen: dict[str, list[dict]] | None = None) -> dict:
    """Per split (one pass, summed over ranks): texts cut at the backbone's text limit, images with regions
    beyond ``max_regions``, phrases lost to truncation. Zeros are reported; a split not read is ``None``.
    ``seen``: {split: [counters per pass]}, ``module.seen`` (the Lightning loop's epochs) unless given."""
    out = {}
    for s, c in (module.seen if seen is None else seen).items():
        e = c[-1] if c else None
        out[s] = ({"texts": e["texts_truncated"], "phrases": e["phrases_dropped"], "regions": e["regions_truncated"]}
                  if e else None)
    out["text_limit"] = module.backbone.text_limit
    out["max_regions"] = getattr(module.backbone, "max_regions", None)
    return out


def json_safe(x):
    """NaN/inf -> None, recursively (results.json is strict JSON that every tool reads)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _pct(x) -> str:
    return f"{100 * x:.2f}" if _num(x) else "-"


def results_markdown(res: dict) -> str:
    b = res["backbone"]
    lines = [f"# {res['task']} / prober={res['prober']} / backbone={b.get('name')} "
             f"({'pretrained' if b.get('pretrained') else 'untrained'}) / seed={res['seed']}"
             + (" / CONTROL task" if res.get("control") else ""), "",
             f"chance (1/C) = {100 * res['chance']:.2f}%"
             + (f", majority class = {100 * res['majority']:.2f}%" if res.get("majority") else ""), "",
             "| layer | name | what it is | val acc (%) | test acc (%) |", "|---:|---|---|---:|---:|"]
    for r in res["layers"]:
        lines.append(f"| {r['layer']} | {r['name']} | {r.get('title', r['name'])} | {_pct(r.get('val_acc'))} | "
                     f"{_pct(r.get('test_acc'))} |")
    if res.get("best"):
        lines += ["", f"best by validation: {res['best']['name']} -> test {_pct(res['best']['test_acc'])}%"]
    tr = {s: v for s, v in (res.get("truncated") or {}).items() if isinstance(v, dict) and any(v.values())}
    if tr:
        lines += ["", "Truncated (per split, one pass): " + "; ".join(
            f"{s}: {v['texts']} text(s) over {res['truncated'].get('text_limit')} tokens, {v['phrases']} phrase(s) "
            f"lost, {v['regions']} image(s) over {res['truncated'].get('max_regions')} regions" for s, v in tr.items())]
    tp = (res.get("throughput") or {}).get("train")
    if tp:
        lines += ["", f"Training throughput: {tp['samples_per_s']:.0f} samples/s, waiting for data "
                      f"{100 * tp['data_wait_frac']:.0f}% of the time (last epoch)"]
    if res.get("data", {}).get("synthetic"):
        lines += ["", "_Demo shards: synthetic scenes with planted signal -- a smoke test, not a result._"]
    return "\n".join(lines) + "\n"


def write_results(rdir: Path, res: dict) -> None:
    text = json.dumps(json_safe(res), indent=2, sort_keys=False, default=float, allow_nan=False)
    (rdir / "results.json").write_text(text + "\n")
    md = results_markdown(res)
    (rdir / "results.md").write_text(md)
    print(md)


def matching_task_run(res: dict, rdir: Path | None) -> dict | None:
    """For a control-task run: the newest ``results.json`` beside ``rdir`` (same parent: a multirun sweep, or the
    runs of one task/prober) of the same task, prober, backbone, seed and data, without control."""
    if rdir is None or not res.get("control"):
        return None
    want_b, hits = res.get("backbone") or {}, []
    for f in Path(rdir).resolve().parent.glob("*/results.json"):
        if f.parent == Path(rdir).resolve():
            continue
        try:
            o = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        b = o.get("backbone") or {}
        if (o.get("task") == res.get("task") and o.get("prober") == res.get("prober") and not o.get("control")
                and not o.get("shuffle_labels") and "mdl" not in o and o.get("seed") == res.get("seed")
                and b.get("name") == want_b.get("name") and b.get("checksum") == want_b.get("checksum")
                and (b.get("config_sha256") == want_b.get("config_sha256")  # unrecorded (older runs): not compared
                     or None in (b.get("config_sha256"), want_b.get("config_sha256")))
                and (o.get("data") or {}).get("root") == (res.get("data") or {}).get("root")):
            hits.append((f.stat().st_mtime, f, o))
    if not hits:
        return None
    _, f, o = max(hits, key=lambda h: (h[0], str(h[1])))
    return {**o, "_path": str(f)}


def layer_chart(res: dict, rdir: Path | None = None) -> dict:
    """The "accuracy by layer" chart of a run: x = layer number (``layer_NN`` rows; ``all_heads`` and ``raw`` are
    in the results table), val and test accuracy, chance and majority as flat lines; for a control-task run the
    control accuracies and, when the matching task run is found (:func:`matching_task_run`), the task accuracy
    and the selectivity (task test - control test). Returns ``{"title", "xs", "names", "series", "summary"}``."""
    rows = sorted((r for r in res["layers"] if r.get("layer", -1) >= 0), key=lambda r: r["layer"])
    xs = [int(r["layer"]) for r in rows]
    ctrl = bool(res.get("control"))
    pre = "control " if ctrl else ""
    series = {f"{pre}val": [r["val_acc"] for r in rows], f"{pre}test": [r["test_acc"] for r in rows],
              "chance": [res["chance"]] * len(rows)}
    if res.get("majority") is not None:
        series["majority"] = [res["majority"]] * len(rows)
    summary = {"chance": res["chance"], "majority": res.get("majority"), "control": ctrl}
    if res.get("best"):
        summary.update({"best/layer": res["best"]["name"], "best/test_acc": res["best"]["test_acc"],
                        "best/val_acc": res["best"]["val_acc"]})
    for r in res["layers"]:
        summary[f"{pre}test_acc/{r['name']}"] = r["test_acc"]
        # the validation accuracy the test number was selected at (each head's best epoch), not the last epoch's that
        # the logged val/acc curve would leave in the summary next to it
        summary[f"{pre}val_acc/{r['name']}"] = r["val_acc"]
        if r.get("val_acc") is not None:
            summary[f"val/acc/{r['name']}"] = r["val_acc"]
    title = "accuracy by layer"
    if ctrl:
        task = matching_task_run(res, rdir)
        if task is None:
            note = ("selectivity not available: no task run (same task, prober, backbone, seed, data, control=false) "
                    "beside this run; python -m value_pl.report --layout selectivity pairs them later")
            title = "control task accuracy by layer (selectivity: no matching task run)"
        else:
            by = {r["name"]: r["test_acc"] for r in task["layers"]}
            series["task test"] = [by.get(r["name"], float("nan")) for r in rows]
            series["selectivity"] = [t - r["test_acc"] for t, r in zip(series["task test"], rows)]
            note = f"selectivity = task test accuracy ({task['_path']}) - control test accuracy"
            title = "accuracy by layer: task, control task and selectivity"
            for r in res["layers"]:
                if r["name"] in by:
                    summary[f"selectivity/{r['name']}"] = by[r["name"]] - r["test_acc"]
        summary["selectivity/available"] = task is not None
        summary["selectivity/note"] = note
    return {"title": title, "xs": xs, "names": [r["name"] for r in rows], "series": series, "summary": summary}


def _wandb_run(logger):
    """The W&B run behind a Lightning ``WandbLogger`` (None for other loggers)."""
    from pytorch_lightning.loggers import WandbLogger

    return logger.experiment if isinstance(logger, WandbLogger) else None


def log_results_table(logger, res: dict, rdir: Path | None = None, columns: tuple[str, ...] = (),
                      summary: dict | None = None) -> None:
    """After a run: the per-layer results table, the "accuracy by layer" chart (W&B: a line-series panel
    ``accuracy_by_layer`` and its data ``accuracy_by_layer_data``) and the run summary (best layer, chance,
    majority, per-layer test accuracy and the validation accuracy it was selected at -- also under ``val/acc/*``,
    which would otherwise keep the last epoch's --, selectivity for control runs). A dashboard never fails a run.

    ``columns``: more per-layer keys of ``res["layers"]`` for the results table (the SentEval driver's selected
    configuration, the MDL driver's codelengths); ``summary``: more items for the run summary."""
    if not logger:
        return
    try:
        base = ("layer", "name", "title", "val_acc", "test_acc")
        cols = [*base, *[c for c in columns if c not in base]]
        if hasattr(logger, "log_table"):
            logger.log_table(key="results", columns=cols, data=[[r.get(c) for c in cols] for r in res["layers"]])
        chart = layer_chart(res, rdir)
        if chart["summary"].get("selectivity/available") is False:
            print(f"[value-pl] {chart['summary']['selectivity/note']}")
        run = _wandb_run(logger)
        if run is None:
            return
        import wandb

        keys = list(chart["series"])
        if chart["xs"]:
            run.log({"accuracy_by_layer": wandb.plot.line_series(
                xs=chart["xs"], ys=[chart["series"][k] for k in keys], keys=keys, title=chart["title"],
                xname="layer")})
            run.log({"accuracy_by_layer_data": wandb.Table(
                columns=["layer", "name", *keys],
                data=[[x, n, *[chart["series"][k][i] for k in keys]]
                      for i, (x, n) in enumerate(zip(chart["xs"], chart["names"]))])})
        run.summary.update({k: v for k, v in {**chart["summary"], **(summary or {})}.items() if v is not None})
    except Exception as e:  # noqa: BLE001 - a dashboard must never fail a run
        log.warning("could not log results table: %s", e)
