"""Aggregate ``results.json`` files over seeds into the paper's table layouts (markdown, CSV, W&B tables).

    python -m value_pl.report RUN_DIRS... [--layout auto|table3|table5|...] [--out DIR] [--wandb]

Every ``results.json`` under the given directories (searched recursively, e.g. a Hydra multirun
directory) is one run. Runs are grouped by (task, prober, model, pretrained, matched/mismatched shards,
control, MDL) and, within a group, by layer; the seeds of a group give **mean +/- the half-width of a 95%
confidence interval** ``t_{0.975, n-1} * sd / sqrt(n)`` (sample sd; no interval for a single seed).

Models: ``SS`` = single-stream (UNITER, VisualBERT), ``TS`` = two-stream (LXMERT), ``BERT`` = text-only
BERT; ``untrained`` is appended for ``backbone.pretrained=false`` runs.

Layouts (``auto`` = all of them that have data):

* ``table3`` / ``table8``: prober rows (attention over all heads, random guess, layer-wise embedding
  prober per layer; table3 keeps layers 1, 5, 12) x VCD/VCC x SS/TS (Table 3/8).
* ``table6``: untrained backbones' attention probers x VCD/VCC/VRI/VRC (Table 6).
* ``fig4``: (a) attention probers on VRI/VRC, matched and mismatched, SS/TS; (b, c) = table9 and table10.
* ``table9`` / ``table10``: layer (with "Original visual emb." = the ``raw`` pseudo-layer) x
  VRI/VRC x matched/mismatched, for SS (table9) and TS (table10).
* ``table5``: task x model, the best layer's test accuracy (by mean test accuracy over seeds, as the paper
  reports the best layer) with the layer; ``table11``: layer x task x model.
* ``selectivity``: accuracy, control-task accuracy and selectivity (paired by seed) per layer.
* ``mdl``: online codelength and compression per layer (task and control runs).

Accuracies are printed in percent.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PAIR_TASKS = ("vcd", "vcc", "vri", "vrc")
SENT_TASKS = ("sentlen", "treedepth", "topconst", "bshift", "tense", "subjnum", "objnum", "somo", "coordinv",
              "wordcontent", "oddmanout")
TASK_TITLES = {"vcd": "VCD", "vcc": "VCC", "vri": "VRI", "vrc": "VRC", "sentlen": "SentLen", "treedepth": "TreeDepth",
               "topconst": "TopConst", "bshift": "BShift", "tense": "Tense", "subjnum": "SubjNum", "objnum": "ObjNum",
               "somo": "SOMO", "coordinv": "CoordInv", "wordcontent": "WordContent", "oddmanout": "OddManOut"}
LAYOUTS = ("table3", "table8", "table6", "fig4", "table9", "table10", "table5", "table11", "selectivity", "mdl")

# two-sided 95% t quantiles t_{0.975, df}, df = 1..30 (used when scipy is missing)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    if df < 1:
        return float("nan")
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except Exception:  # noqa: BLE001 - scipy is optional
        return _T975[df - 1] if df <= 30 else 1.960 + 2.4 / df  # normal approximation with a small correction


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else float("nan")

    @property
    def ci95(self) -> float:
        """Half-width of the 95% t interval (nan for a single value)."""
        return t975(self.n - 1) * self.sd / math.sqrt(self.n) if self.n > 1 else float("nan")

    def fmt(self, scale: float = 100.0, digits: int = 2) -> str:
        if not self.values:
            return "-"
        s = f"{scale * self.mean:.{digits}f}"
        return s + (f" ± {scale * self.ci95:.{digits}f}" if self.n > 1 else "")


@dataclass
class Table:
    name: str
    title: str
    rows: list[str] = field(default_factory=list)
    cols: list[str] = field(default_factory=list)
    cells: dict = field(default_factory=dict)  # (row, col) -> Stat | str
    scale: float = 100.0
    note: str = ""

    def put(self, row: str, col: str, v) -> None:
        if row not in self.rows:
            self.rows.append(row)
        if col not in self.cols:
            self.cols.append(col)
        self.cells[(row, col)] = v

    def text(self, row: str, col: str) -> str:
        v = self.cells.get((row, col))
        if v is None:
            return "/"
        return v.fmt(self.scale) if isinstance(v, Stat) else str(v)

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| | " + " | ".join(self.cols) + " |", "|---|" + "---:|" * len(self.cols)]
        for r in self.rows:
            out.append(f"| {r} | " + " | ".join(self.text(r, c) for c in self.cols) + " |")
        if self.note:
            out += ["", self.note]
        return "\n".join(out) + "\n"

    def long_rows(self) -> list[dict]:
        out = []
        for r in self.rows:
            for c in self.cols:
                v = self.cells.get((r, c))
                if v is None:
                    continue
                if isinstance(v, Stat):
                    out.append({"table": self.name, "row": r, "column": c, "mean": v.mean * self.scale,
                                "ci95": v.ci95 * self.scale, "n": v.n, "text": v.fmt(self.scale),
                                "values": " ".join(f"{x * self.scale:.6g}" for x in v.values)})
                else:
                    out.append({"table": self.name, "row": r, "column": c, "mean": None, "ci95": None, "n": None,
                                "text": str(v), "values": ""})
        return out

    def empty(self) -> bool:
        """No measured cell (a table of only "Random guess" entries counts as empty)."""
        return all(r == "Random guess" for r, _ in self.cells)


# ------------------------------------------------------------------ loading
def model_label(res: dict) -> str:
    b = res.get("backbone") or {}
    fam = b.get("family", "")
    m = {"lxmert": "TS", "bert": "BERT"}.get(fam, "SS")
    return m if b.get("pretrained", True) else f"{m} untrained"


def find_results(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(p.rglob("results.json")))
        else:
            raise FileNotFoundError(f"{p}: not a run directory or results.json")
    return sorted(set(out))


def load_runs(paths) -> list[dict]:
    runs = []
    for f in find_results(paths):
        res = json.loads(f.read_text())
        res["_path"] = str(f)
        runs.append(res)
    return runs


def group_key(res: dict) -> tuple:
    d = res.get("data") or {}
    mismatch = bool(d.get("mismatch")) or "mismatch" in f"{d.get('root', '')} {d.get('dataset', '')}"
    return (res["task"], res["prober"], model_label(res), mismatch, bool(res.get("control")), "mdl" in res)


class Runs:
    """Per (group key, layer name): {seed: row}."""

    def __init__(self, runs: list[dict]):
        self.runs = runs
        self.by: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
        self.chance: dict[str, float] = {}
        for r in runs:
            k = group_key(r)
            self.chance[r["task"]] = r.get("chance", float("nan"))
            for row in r.get("layers", []):
                self.by[k][row["name"]][int(r.get("seed", 0))] = row

    def stat(self, task, prober, model, layer, mismatch=False, control=False, mdl=False, field="test_acc") -> Stat | None:
        d = self.by.get((task, prober, model, mismatch, control, mdl), {}).get(layer)
        if not d:
            return None
        vals = [float(row[field]) for _, row in sorted(d.items()) if row.get(field) is not None
                and row[field] == row[field]]
        return Stat(vals) if vals else None

    def layers(self, task, prober, model, mismatch=False, control=False, mdl=False) -> list[str]:
        names = list(self.by.get((task, prober, model, mismatch, control, mdl), {}))
        return sorted(names, key=_layer_order)

    def models(self) -> list[str]:
        order = {"SS": 0, "TS": 1, "BERT": 2}
        ms = {k[2] for k in self.by}
        return sorted(ms, key=lambda m: (order.get(m.split()[0], 9), m))

    def keys(self):
        return list(self.by)


def _layer_order(name: str):
    if name == "raw":
        return (-1, 0)
    m = re.match(r"layer_(\d+)$", name)
    if m:
        return (0, int(m.group(1)))
    return (1, name)


def layer_title(name: str) -> str:
    if name == "raw":
        return "Original visual emb."
    m = re.match(r"layer_(\d+)$", name)
    if m:
        k = int(m.group(1))
        return "Embeddings (L0)" if k == 0 else f"Layer {k}"
    if name == "all_heads":
        return "All attention heads"
    return name


# ------------------------------------------------------------------ layouts
def table_coref(R: Runs, name: str, keep_layers=None) -> Table:
    t = Table(name, "Table 3: VCD/VCC, attention and layer-wise embedding probers" if name == "table3" else
              "Table 8: VCD/VCC, all layers")
    models = [m for m in R.models() if m in ("SS", "TS")]
    cols = [(task, m) for task in ("vcd", "vcc") for m in models]
    for task, m in cols:
        col = f"{TASK_TITLES[task]} ({m})"
        s = R.stat(task, "attention", m, "all_heads")
        if s:
            t.put("All attention heads", col, s)
        if task in R.chance:
            t.put("Random guess", col, f"{100 * R.chance[task]:.2f}")
    for task, m in cols:
        col = f"{TASK_TITLES[task]} ({m})"
        for layer in R.layers(task, "layer_emb", m):
            k = _layer_order(layer)[1] if layer.startswith("layer_") else None
            if keep_layers is not None and k not in keep_layers:
                continue
            s = R.stat(task, "layer_emb", m, layer)
            if s:
                t.put(layer_title(layer), col, s)
    t.rows = sorted(t.rows, key=lambda r: (r != "All attention heads", r != "Random guess",
                                           int(r.split()[-1]) if r.startswith("Layer ") else 0))
    return t


def table_untrained(R: Runs) -> Table:
    t = Table("table6", "Table 6: untrained backbones, attention probers (all heads)")
    for m in R.models():
        if not m.endswith("untrained"):
            continue
        for task in PAIR_TASKS:
            s = R.stat(task, "attention", m, "all_heads")
            if s:
                t.put(f"Untrained {m.split()[0]}", TASK_TITLES[task], s)
    return t


def table_relations(R: Runs, model: str, name: str) -> Table:
    t = Table(name, f"Table {name[5:]}: layer-wise embedding probers on VRI/VRC, {model}, matched and mismatched"
              + " (Fig. 4b/c)")
    for mismatch in (False, True):
        for task in ("vri", "vrc"):
            col = f"{TASK_TITLES[task]} ({model}{' mis.' if mismatch else ''})"
            for layer in R.layers(task, "layer_emb", model, mismatch):
                s = R.stat(task, "layer_emb", model, layer, mismatch)
                if s:
                    t.put(layer_title(layer), col, s)
    order = {layer_title(n): _layer_order(n) for n in ["raw"] + [f"layer_{i:02d}" for i in range(64)]}
    t.rows = sorted(t.rows, key=lambda r: order.get(r, (2, r)))
    return t


def table_fig4a(R: Runs) -> Table:
    t = Table("fig4a", "Fig. 4(a): attention probers (all heads) on VRI/VRC")
    for m in [m for m in R.models() if m in ("SS", "TS")]:
        for task in ("vri", "vrc"):
            col = f"{TASK_TITLES[task]} ({m})"
            for mismatch, row in ((False, "All attention heads"), (True, "All attention heads (mismatch)")):
                s = R.stat(task, "attention", m, "all_heads", mismatch)
                if s:
                    t.put(row, col, s)
            if task in R.chance:
                t.put("Random guess", col, f"{100 * R.chance[task]:.2f}")
    return t


def _sent_tasks(R: Runs) -> list[str]:
    present = {k[0] for k in R.keys()}
    return [t for t in SENT_TASKS if t in present]


def _sent_prober(R: Runs, task: str, m: str) -> str | None:
    for p in ("senteval_mlp", "senteval_lr", "layer_emb"):
        if (task, p, m, False, False, False) in R.by:
            return p
    cands = [k[1] for k in R.keys() if k[0] == task and k[2] == m and not k[4] and not k[5]]
    return cands[0] if cands else None


def table_linguistic(R: Runs, name: str) -> Table:
    tasks = _sent_tasks(R)
    if name == "table5":
        t = Table("table5", "Table 5: linguistic probing, best layer per task (Ln)")
        for m in R.models():
            for task in tasks:
                p = _sent_prober(R, task, m)
                if p is None:
                    continue
                best = None
                for layer in R.layers(task, p, m):
                    s = R.stat(task, p, m, layer)
                    if s and (best is None or s.mean > best[1].mean):
                        best = (layer, s)
                if best:
                    k = _layer_order(best[0])[1]
                    t.put(m, TASK_TITLES[task], f"{best[1].fmt()} (L{k})")
        return t
    t = Table("table11", "Table 11: linguistic probing, every layer")
    for task in tasks:
        for m in R.models():
            p = _sent_prober(R, task, m)
            if p is None:
                continue
            for layer in R.layers(task, p, m):
                s = R.stat(task, p, m, layer)
                if s:
                    t.put(layer_title(layer), f"{TASK_TITLES[task]} ({m})", s)
    t.rows = sorted(t.rows, key=lambda r: int(re.sub(r"\D", "", r) or 0))
    return t


def table_selectivity(R: Runs) -> Table:
    t = Table("selectivity", "Selectivity (Hewitt & Liang 2019): task accuracy - control accuracy, paired by seed")
    for (task, prober, m, mis, control, mdl) in R.keys():
        if control or mdl:
            continue
        ctrl = R.by.get((task, prober, m, mis, True, False))
        if not ctrl:
            continue
        for layer in R.layers(task, prober, m, mis):
            real = R.by[(task, prober, m, mis, False, False)][layer]
            cl = ctrl.get(layer, {})
            seeds = sorted(set(real) & set(cl))
            if not seeds:
                continue
            row = f"{TASK_TITLES.get(task, task)} / {prober} / {m}{' mis.' if mis else ''} / {layer_title(layer)}"
            t.put(row, "accuracy", Stat([real[s]["test_acc"] for s in seeds]))
            t.put(row, "control accuracy", Stat([cl[s]["test_acc"] for s in seeds]))
            t.put(row, "selectivity", Stat([real[s]["test_acc"] - cl[s]["test_acc"] for s in seeds]))
    return t


def table_mdl(R: Runs) -> Table:
    t = Table("mdl", "MDL online code (Voita & Titov 2020): codelength (kbits) and compression", scale=1.0)
    for (task, prober, m, mis, control, mdl) in R.keys():
        if not mdl:
            continue
        for layer in R.layers(task, prober, m, mis, control, True):
            row = (f"{TASK_TITLES.get(task, task)}{' (control)' if control else ''} / {prober} / {m}"
                   f"{' mis.' if mis else ''} / {layer_title(layer)}")
            code = R.stat(task, prober, m, layer, mis, control, True, "codelength_bits")
            if code:
                t.put(row, "codelength (kbits)", Stat([v / 1000 for v in code.values]))
                t.put(row, "compression", R.stat(task, prober, m, layer, mis, control, True, "compression"))
                acc = R.stat(task, prober, m, layer, mis, control, True)
                if acc:
                    t.put(row, "test acc (%)", Stat([100 * v for v in acc.values]))
    return t


def build_tables(runs: list[dict], layout: str = "auto") -> list[Table]:
    R = Runs(runs)
    make = {
        "table3": lambda: [table_coref(R, "table3", keep_layers={1, 5, 12})],
        "table8": lambda: [table_coref(R, "table8")],
        "table6": lambda: [table_untrained(R)],
        "fig4": lambda: [table_fig4a(R), table_relations(R, "SS", "table9"), table_relations(R, "TS", "table10")],
        "table9": lambda: [table_relations(R, "SS", "table9")],
        "table10": lambda: [table_relations(R, "TS", "table10")],
        "table5": lambda: [table_linguistic(R, "table5")],
        "table11": lambda: [table_linguistic(R, "table11")],
        "selectivity": lambda: [table_selectivity(R)],
        "mdl": lambda: [table_mdl(R)],
    }
    names = [n for n in LAYOUTS if n not in ("table9", "table10")] if layout == "auto" else layout.split(",")
    out, seen = [], set()
    for n in names:
        if n not in make:
            raise ValueError(f"unknown layout {n!r}; one of auto, {', '.join(LAYOUTS)}")
        for t in make[n]():
            if t.name not in seen and (not t.empty() or layout != "auto"):
                seen.add(t.name)
                out.append(t)
    return out


def write_tables(tables: list[Table], out: Path, n_runs: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# value-pl report ({n_runs} runs)", "",
          "mean ± half-width of the 95% t confidence interval over seeds (no interval for one seed); accuracies in %.", ""]
    for t in tables:
        md.append(t.markdown())
        with open(out / f"{t.name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["table", "row", "column", "mean", "ci95", "n", "text", "values"])
            w.writeheader()
            w.writerows(t.long_rows())
    p = out / "report.md"
    p.write_text("\n".join(md))
    return p


def log_wandb(tables: list[Table], project: str = "value-pl", name: str | None = None) -> None:
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project=project, name=name or "report", job_type="report", reinit=True)
    for t in tables:
        data = [[r] + [t.text(r, c) for c in t.cols] for r in t.rows]
        run.log({f"report/{t.name}": wandb.Table(columns=["row"] + t.cols, data=data)})
        lr = t.long_rows()
        if lr:
            cols = list(lr[0])
            run.log({f"report/{t.name}_long": wandb.Table(columns=cols, data=[[x[c] for c in cols] for x in lr])})
    run.finish()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m value_pl.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (searched recursively for results.json)")
    ap.add_argument("--layout", default="auto", help=f"auto or comma-separated of: {', '.join(LAYOUTS)}")
    ap.add_argument("--out", default=None, help="output directory (default: the first run directory / report)")
    ap.add_argument("--wandb", action="store_true", help="also log the tables as W&B tables (WANDB_MODE honoured)")
    ap.add_argument("--project", default="value-pl")
    a = ap.parse_args(argv)
    runs = load_runs(a.runs)
    if not runs:
        print("no results.json found under " + " ".join(a.runs), file=sys.stderr)
        return 1
    tables = build_tables(runs, a.layout)
    out = Path(a.out) if a.out else Path(a.runs[0]) / "report"
    p = write_tables(tables, out, len(runs))
    print(p.read_text())
    print(f"[value-pl] wrote {p} and {len(tables)} CSV file(s) to {out}")
    if a.wandb:
        log_wandb(tables, a.project)
    return 0


if __name__ == "__main__":
    sys.exit(main())
