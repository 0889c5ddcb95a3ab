"""A run's ``results.json`` / ``results.md`` and the results table for the logger."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from ..data.datamodule import ShardDataModule
from ..probers.module import ProbeModule
from ..protocols.control import control_info

log = logging.getLogger("value_pl")


def results_dict(cfg: DictConfig, module: ProbeModule, dm: ShardDataModule, extra: dict | None = None,
                 rows: list[dict] | None = None, pairs_dropped=None) -> dict:
    """The ``results.json`` of a run; drivers that train heads outside Lightning (MDL, SentEval) pass their
    own per-layer ``rows``."""
    rows = module.layer_rows() if rows is None else rows
    finite = [r for r in rows if r["test_acc"] == r["test_acc"]]
    best_by_val = max(finite, key=lambda r: r["val_acc"]) if finite else None
    counts = dm.label_counts(module.task["name"], "test")
    total = sum(counts.values())
    res = {
        "task": module.task["name"],
        "prober": module.prober_name,
        "backbone": module.backbone.describe(),
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
        "majority": (max(counts.values()) / total) if total else None,
        "layers": rows,
        "best": ({"layer": best_by_val["layer"], "name": best_by_val["name"], "test_acc": best_by_val["test_acc"],
                  "val_acc": best_by_val["val_acc"]} if best_by_val else None),
        "pairs_dropped": module.pairs_dropped if pairs_dropped is None else pairs_dropped,
        # pairs in val/test metrics, summed over ranks (== the manifest's count: each sample exactly once)
        "pairs_evaluated": dict(module.pairs_evaluated),
    }
    if extra:
        res.update(extra)
    return res


def results_markdown(res: dict) -> str:
    b = res["backbone"]
    lines = [f"# {res['task']} / prober={res['prober']} / backbone={b.get('name')} "
             f"({'pretrained' if b.get('pretrained') else 'untrained'}) / seed={res['seed']}"
             + (" / CONTROL task" if res.get("control") else ""), "",
             f"chance (1/C) = {100 * res['chance']:.2f}%"
             + (f", majority class = {100 * res['majority']:.2f}%" if res.get("majority") else ""), "",
             "| layer | name | what it is | val acc (%) | test acc (%) |", "|---:|---|---|---:|---:|"]
    for r in res["layers"]:
        lines.append(f"| {r['layer']} | {r['name']} | {r.get('title', r['name'])} | {100 * r['val_acc']:.2f} | "
                     f"{100 * r['test_acc']:.2f} |")
    if res.get("best"):
        lines += ["", f"best by validation: {res['best']['name']} -> test {100 * res['best']['test_acc']:.2f}%"]
    if res.get("data", {}).get("synthetic"):
        lines += ["", "_Demo shards: synthetic scenes with planted signal -- a smoke test, not a result._"]
    return "\n".join(lines) + "\n"


def write_results(rdir: Path, res: dict) -> None:
    (rdir / "results.json").write_text(json.dumps(res, indent=2, sort_keys=False, default=float) + "\n")
    md = results_markdown(res)
    (rdir / "results.md").write_text(md)
    print(md)


def log_results_table(logger, res: dict) -> None:
    if logger and hasattr(logger, "log_table"):
        try:
            cols = ["layer", "name", "val_acc", "test_acc"]
            logger.log_table(key="results", columns=cols, data=[[r[c] for c in cols] for r in res["layers"]])
        except Exception as e:  # noqa: BLE001 - a dashboard must never fail a run
            log.warning("could not log results table: %s", e)
