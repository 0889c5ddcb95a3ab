"""Aggregate ``results.json`` files and ``python -m value_pl.analyze`` runs over seeds into the paper's table
layouts (markdown, CSV, W&B tables).

    python -m value_pl.report RUN_DIRS... [--layout auto|table3|table5|...] [--out DIR] [--wandb]

Writes ``<out>/report.md`` (``--layout auto``) or ``<out>/report-<layouts>.md`` (``--layout table3,table8`` ->
``report-table3-table8.md``, so one directory keeps the reports of several layouts) and ``<out>/<table>.csv``.

Every ``results.json`` under the given directories (searched recursively, e.g. a Hydra multirun
directory) is one run. Runs are grouped by (task, prober, model, pretrained, matched/mismatched shards,
control, MDL) and, within a group, by layer; the seeds of a group give **mean +/- the half-width of a 95%
confidence interval** ``t_{0.975, n-1} * sd / sqrt(n)`` (sample sd; no interval for a single seed).

Models: ``SS`` = single-stream (UNITER, VisualBERT), ``TS`` = two-stream (LXMERT), ``BERT`` = text-only
BERT; ``untrained`` is appended for ``backbone.pretrained=false`` runs, ``shuffled labels`` for the
``shuffle_labels=true`` sanity runs and ``derived data`` for SentEval-style tasks built from captions (not
SentEval's files): these are their own rows, never averaged with the others, and the paper's SS/TS tables take
only the plain labels. The seeds of a cell must be runs of one model: two runs of one configuration with the
same seed, runs of two backbones under one label (two UNITER checkpoints; UNITER and VisualBERT), or of one
backbone built with two model configs (``results.json``'s ``backbone.config_sha256``: another ``layer_norm_eps``,
attention implementation, weights dtype, ...; the differing fields named from ``backbone.model_config``), are
refused with both files named -- report each backbone's runs on their own. Runs written before the config was
recorded are not refused but named under every table they reach (**Config unknown**). So are seeds of one cell trained
differently (``results.json``'s ``training``: epochs, batch caps, batch size, lr, ...; precision aside), and seeds
that read different data (``data.dataset``, ``data.synthetic``). Smoke tests (``fast_dev_run``, capped batches)
and runs on the synthetic demo shards are marked **Not a result** under every table they reach.

Layouts (``auto`` = all of them that have data):

* ``table3`` / ``table8``: prober rows (attention over all heads, random guess, layer-wise embedding
  prober per layer; table3 keeps layers 1, 5, 12) x VCD/VCC x SS/TS (Table 3/8).
* ``table6``: untrained backbones' attention probers x VCD/VCC/VRI/VRC (Table 6).
* ``fig4``: (a) attention probers on VRI/VRC, matched and mismatched, SS/TS; (b, c) = table9 and table10.
* ``table9`` / ``table10``: layer (with "Original visual emb." = the ``raw`` pseudo-layer) x
  VRI/VRC x matched/mismatched, for SS (table9) and TS (table10).
* Control rows: a run with the geometry-only control (``geometry_baseline=true``, the ``boxes`` pseudo-layer) adds
  "Box geometry only (control)" above the layers of table3/table8 (VCD/VCC) and table9/table10 (VRI/VRC).
* ``table5``: task x model, the test accuracy of the layer (of Layers 1..L, as the paper: not the embedding
  output) with the best mean dev (validation) accuracy over seeds, with the layer; ``table11``: layer x task x model.
* ``selectivity``: accuracy, control-task accuracy and selectivity (paired by seed) per layer.
* ``mdl``: online codelength and compression per layer (task and control runs).

Training-free layouts, from analyze runs (their ``<analysis>.json`` files, found recursively; grouped by analysis,
model label and dataset -- the manifest's name, ``Flickr30k`` / ``Visual Genome`` -- with the same refusals;
runs of a capped sample, ``max_samples``, or on demo shards are marked **Not a result**, cut inputs are said;
:mod:`.analyses`):

* ``table1``: NMI per layer in the paper's Table 1 numbering (columns 0..11), rows model / dataset (Table 1;
  the untrained twins' rows are App. B's numbers).
* ``table2``: coreference, max attention V->T, T->V and their (Rand.) baselines with the head, rows model: type.
* ``table4``: relations, max attention between subject and object regions (and Rand.), a column pair per model.
* ``table7``: the ratio of the type's selected V->T head, a row per model, the types as columns.
* ``modality``: Figs. 2-3's numbers: [CLS] modality importance per layer and overall, image-to-text heads
  (and ``modality_heads``: per head).

Accuracies are printed in percent.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .analyses import Analyses, load_analyses
from .collect import ANALYSIS_LAYOUTS, LAYOUTS, Runs, Stat, Table, find_results, layer_title, load_runs, model_label, t975
from .layouts import build_tables

__all__ = ["LAYOUTS", "Analyses", "Runs", "Stat", "Table", "build_tables", "find_results", "layer_title",
           "load_analyses", "load_runs", "log_wandb", "model_label", "report_name", "summary_cells", "t975",
           "write_tables"]


def report_name(layout: str = "auto") -> str:
    """The markdown file of a report: ``report.md`` for ``auto`` (what a sweep writes), else named after the
    layouts (``table3`` -> ``report-table3.md``, ``table3,table8`` -> ``report-table3-table8.md``), so reports of
    several layouts on one directory sit side by side."""
    names = list(dict.fromkeys(n for n in str(layout or "auto").split(",") if n))
    return "report.md" if names in ([], ["auto"]) else f"report-{'-'.join(names)}.md"


def write_tables(tables: list[Table], out: Path, n_runs: int, layout: str = "auto") -> Path:
    """The report's markdown (:func:`report_name`) and one CSV per table (``<table>.csv``) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# value-pl report ({n_runs} runs)" + ("" if layout in (None, "", "auto") else f", layout {layout}"), "",
          "mean ± half-width of the 95% t confidence interval over seeds (no interval for one seed); accuracies in %"
          + ("; the training-free tables' NMI, attention weights and ratios as fractions (0-1)."
             if any(t.name in ANALYSIS_LAYOUTS or t.name == "modality_heads" for t in tables) else "."), ""]
    for t in tables:
        md.append(t.markdown())
        with open(out / f"{t.name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["table", "row", "column", "mean", "ci95", "n", "text", "values"])
            w.writeheader()
            w.writerows(t.long_rows())
    p = out / report_name(layout)
    p.write_text("\n".join(md))
    return p


def summary_cells(tables: list[Table]) -> dict:
    """``{"<table>/<row>/<column>": mean}`` (in %) of every measured cell, plus ``.../ci95``, ``.../n``, ``.../layer``
    (Table 5's layer chosen on dev) and each table's markdown under ``<table>/markdown``: what a W&B run summary
    shows of the paper's tables."""
    out: dict = {}
    for t in tables:
        out[f"{t.name}/markdown"] = t.markdown()
        for r in t.rows:
            for c in t.cols:
                v = t.cells.get((r, c))
                if isinstance(v, Stat) and v.values:
                    key = f"{t.name}/{r}/{c}"
                    out[key] = v.mean * t.scale
                    if v.n > 1:
                        out[f"{key}/ci95"] = v.ci95 * t.scale
                    out[f"{key}/n"] = v.n
                    if v.tag:
                        out[f"{key}/layer"] = v.tag
    return out


def log_wandb(tables: list[Table], project: str = "value-pl", name: str | None = None, group: str | None = None,
              dir: str | None = None) -> None:
    """One W&B run (``job_type=report``; offline unless ``WANDB_MODE`` says otherwise) holding the tables
    (``report/<table>``, wide and long) and, in its summary, every cell (:func:`summary_cells`). With ``group``
    (a multirun's group, see ``value_pl.driver.setup.sweep_group``) the run joins the runs it summarises."""
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=project, name=name or (f"{group}-report" if group else "report"), job_type="report",
                     group=group, dir=dir, reinit=True)
    for t in tables:
        data = [[r] + [t.text(r, c) for c in t.cols] for r in t.rows]
        run.log({f"report/{t.name}": wandb.Table(columns=["row"] + t.cols, data=data)})
        lr = t.long_rows()
        if lr:
            cols = list(lr[0])
            run.log({f"report/{t.name}_long": wandb.Table(columns=cols, data=[[x[c] for c in cols] for x in lr])})
    run.summary.update(summary_cells(tables))
    run.finish()
