"""Collecting runs for the report: ``results.json`` files, grouping by (task, prober, model, ...), mean +/- 95% CI."""
from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PAIR_TASKS = ("vcd", "vcc", "vri", "vrc")
SENT_TASKS = ("sentlen", "treedepth", "topconst", "bshift", "tense", "subjnum", "objnum", "somo", "coordinv",
              "wordcontent", "oddmanout")
TASK_TITLES = {"vcd": "VCD", "vcc": "VCC", "vri": "VRI", "vrc": "VRC", "sentlen": "SentLen", "treedepth": "TreeDepth",
               "topconst": "TopConst", "bshift": "BShift", "tense": "Tense", "subjnum": "SubjNum", "objnum": "ObjNum",
               "somo": "SOMO", "coordinv": "CoordInv", "wordcontent": "WordContent", "oddmanout": "OddManOut"}
LAYOUTS = ("table3", "table8", "table6", "fig4", "table9", "table10", "table5", "table11", "selectivity", "mdl",
           "table1", "table2", "table4", "table7", "modality")
#: the layouts built from ``python -m value_pl.analyze`` runs (value_pl/report/analyses.py), not results.json
ANALYSIS_LAYOUTS = ("table1", "table2", "table4", "table7", "modality")
#: the per-analysis files of an analyze run that the report reads (``<analysis>.json``; analysis.json lists them)
ANALYSIS_FILES = ("fusion", "coref", "relation", "modality", "i2t")

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
    tag: str = ""  # shown after the number, e.g. Table 5's chosen layer "L3"

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
        return s + (f" ± {scale * self.ci95:.{digits}f}" if self.n > 1 else "") + (f" ({self.tag})" if self.tag else "")


@dataclass
class Table:
    name: str
    title: str
    rows: list[str] = field(default_factory=list)
    cols: list[str] = field(default_factory=list)
    cells: dict = field(default_factory=dict)  # (row, col) -> Stat | str
    scale: float = 100.0
    note: str = ""
    digits: int = 2

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
        return v.fmt(self.scale, self.digits) if isinstance(v, Stat) else str(v)

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
                                "ci95": v.ci95 * self.scale, "n": v.n, "text": v.fmt(self.scale, self.digits),
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
    """``SS`` / ``TS`` / ``BERT``, then `` untrained`` (random-weight twin), `` shuffled labels`` (the sanity
    baseline) and `` derived data`` (SentEval-style tasks derived from captions, not SentEval's files): runs that
    differ in any of these are never averaged together, and only plain ``SS`` / ``TS`` fill the paper's tables."""
    b = res.get("backbone") or {}
    fam = b.get("family", "")
    m = {"lxmert": "TS", "bert": "BERT"}.get(fam, "SS")
    if not b.get("pretrained", True):
        m += " untrained"
    if res.get("shuffle_labels"):
        m += " shuffled labels"
    if str((res.get("data") or {}).get("dataset") or "").startswith("derived"):
        m += " derived data"
    return m


def backbone_identity(res: dict) -> tuple:
    """What makes two runs' backbones the same model: family, name, checkpoint and, for pretrained weights,
    their checksum (random twins are rebuilt from their seed)."""
    b = res.get("backbone") or {}
    return (b.get("family"), b.get("name"), b.get("checkpoint") or b.get("path"),
            b.get("checksum") if b.get("pretrained", True) else None)


def config_record(res: dict) -> tuple[str | None, dict | None]:
    """A run's backbone model config: its hash (``config_sha256``: the effective model config the backbone was built
    with, e.g. ``layer_norm_eps``, the attention implementation, the weights' dtype) and the record itself
    (``model_config``); ``None`` where the run was written before it was recorded."""
    b = res.get("backbone") or {}
    rec = b.get("model_config")
    return b.get("config_sha256"), rec if isinstance(rec, dict) else None


def config_differences(a: dict | None, b: dict | None) -> str:
    """The fields in which two model config records differ (``field A vs B``; fields only one records named)."""
    def norm(v) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    if a is None or b is None:
        return "the config fields were not recorded (results written before model_config was)"
    diff = [f"{k} {a[k]!r} vs {b[k]!r}" for k in sorted(set(a) & set(b), key=str) if norm(a[k]) != norm(b[k])]
    odd = sorted(set(a) ^ set(b), key=str)
    if odd:
        diff.append("recorded by one only: " + ", ".join(odd[:8]) + (" ..." if len(odd) > 8 else ""))
    return "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "") if diff else "no field differs"


class ConfigCheck:
    """The backbone model config of the runs under one model label must be one: runs of the same weights with
    another ``layer_norm_eps`` or attention implementation are runs of another model. Differing hashes are refused,
    both files and the differing fields named; runs without a hash (written before it was recorded) are kept in
    ``unknown`` for a note, neither refused nor taken for agreeing."""

    def __init__(self, what: str = "runs"):
        self.what = what
        self.first: dict[str, tuple[str, dict | None, str]] = {}
        self.unknown: list[str] = []

    def add(self, label: str, res: dict, where: str) -> None:
        h, rec = config_record(res)
        if h is None:
            self.unknown.append(where)
            return
        h0, rec0, w0 = self.first.setdefault(label, (h, rec, where))
        if h != h0:
            raise ValueError(
                f"{w0} and {where}: {self.what} of one backbone under the model label {label!r} ran it with different "
                f"model configs (config_sha256 {h0} vs {h}: {config_differences(rec0, rec)}). Averaging them would "
                f"publish a number of no single model: report them separately, or rerun one of them with the "
                f"other's backbone config")


def config_unknown_note(paths: list[str], total: int, what: str = "runs") -> str:
    """The note under a table some of whose runs did not record their backbone's model config (named)."""
    if not paths:
        return ""
    return (f"**Config unknown:** {len(paths)} of the {total} {what} were written before the backbone's model "
            f"config (config_sha256) was recorded, so whether they ran it as the other seeds did (layer_norm_eps, "
            f"attention implementation, ...) cannot be told (run them again to know): " + ", ".join(sorted(paths))
            + ".")


SMOKE_FIELDS = ("fast_dev_run", "limit_train_batches", "limit_val_batches", "limit_test_batches", "train_batches")


def run_budget(res: dict) -> dict | None:
    """How a run's heads were trained, as far as it decides the numbers: a Lightning run's ``training`` record
    (less its precision), SentEval's ``protocol`` (less the seed), MDL's fitting settings; ``None`` for results
    written before runs recorded it (not compared)."""
    if isinstance(res.get("training"), dict):
        return {k: v for k, v in res["training"].items() if k != "precision"}
    if isinstance(res.get("protocol"), dict):
        return {k: v for k, v in res["protocol"].items() if k != "seed"}
    if isinstance(res.get("mdl"), dict):
        return {k: v for k, v in res["mdl"].items() if k not in ("layers", "method")}
    return None


def is_smoke_test(res: dict) -> bool:
    """A run that trained or evaluated on part of the data on purpose (``fast_dev_run``, ``limit_*_batches``,
    ``data.train_batches``): its numbers are a check that things run, not a result."""
    b = run_budget(res) or {}
    if b.get("fast_dev_run") or b.get("train_batches") is not None:
        return True
    # Lightning's limits: a float is a share of the batches (1.0 = all), an int a number of batches
    return any(v is not None and not (isinstance(v, float) and v == 1.0)
               for v in (b.get(k) for k in SMOKE_FIELDS if k.startswith("limit_")))


def find_results(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            out.append(p)
        elif p.is_file() and p.name in ("analysis.json", *(f"{a}.json" for a in ANALYSIS_FILES)):
            continue  # an analyze run's file: value_pl.report.analyses reads it
        elif p.is_dir():
            out.extend(sorted(p.rglob("results.json")))
        else:
            raise FileNotFoundError(f"{p}: not a run directory, results.json or an analyze run's analysis.json / "
                                    f"<analysis>.json")
    return sorted(set(out))


def load_runs(paths) -> list[dict]:
    runs = []
    for f in find_results(paths):
        res = json.loads(f.read_text())
        res["_path"] = str(f)
        runs.append(res)
    return runs


def _ident_text(ident: tuple) -> str:
    fam, name, ckpt, checksum = ident
    return ", ".join(f"{k} {v}" for k, v in (("family", fam), ("name", name), ("checkpoint", ckpt),
                                                ("checksum", checksum)) if v)


def _key_text(k: tuple) -> str:
    task, prober, model, mismatch, control, mdl = k
    return " / ".join([task, prober, model] + ["mismatched"] * mismatch + ["control"] * control + ["MDL"] * mdl)


def group_key(res: dict) -> tuple:
    d = res.get("data") or {}
    mismatch = bool(d.get("mismatch")) or "mismatch" in f"{d.get('root', '')} {d.get('dataset', '')}"
    return (res["task"], res["prober"], model_label(res), mismatch, bool(res.get("control")), "mdl" in res)


class Runs:
    """Per (group key, layer name): {seed: row}.

    The seeds of one cell are the runs of one configuration: two runs with the same group key, layer and seed,
    or runs of different backbones under one model label (two UNITER checkpoints, or UNITER and VisualBERT, both
    ``SS``), or runs of one backbone built with different model configs (:class:`ConfigCheck`), or runs of one
    group on different data (another dataset, or synthetic demo shards), are refused with both files named --
    averaging or overwriting them would publish a number of no single model on no single dataset. Runs on
    synthetic demo shards are listed (``synthetic``): the layouts mark their tables **Not a result**."""

    def __init__(self, runs: list[dict]):
        self.runs = runs
        self.by: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
        self.chance: dict[str, float] = {}
        src: dict[tuple, str] = {}
        models: dict[str, dict[tuple, str]] = defaultdict(dict)
        budgets: dict[tuple, tuple[dict, str]] = {}
        self.smoke = [r.get("_path", "?") for r in runs if is_smoke_test(r)]
        self.synthetic = [r.get("_path", "?") for r in runs if (r.get("data") or {}).get("synthetic")]
        datas: dict[tuple, tuple[tuple, str]] = {}
        configs = ConfigCheck()
        for r in runs:
            k = group_key(r)
            where = r.get("_path", "?")
            b = run_budget(r)
            if b is not None:
                b0, w0 = budgets.setdefault(k, (b, where))
                diff = sorted(f for f in set(b) | set(b0) if b.get(f) != b0.get(f))
                if diff:
                    raise ValueError(
                        f"{where} and {w0}: runs of one configuration ({_key_text(k)}) trained differently ("
                        + ", ".join(f"{f} {b0.get(f)!r} vs {b.get(f)!r}" for f in diff) + "); the seeds of a "
                        "cell must differ only in their seed: report them separately")
            d = r.get("data") or {}
            ident = (d.get("dataset"), bool(d.get("synthetic")))
            d0, w0 = datas.setdefault(k, (ident, where))
            if ident != d0:
                raise ValueError(
                    f"{where} and {w0}: runs of one configuration ({_key_text(k)}) read different data (dataset "
                    f"{d0[0]!r}{' (synthetic)' if d0[1] else ''} vs {ident[0]!r}{' (synthetic)' if ident[1] else ''});"
                    " a cell averages the seeds of one model on one dataset: report them separately")
            models[k[2]].setdefault(backbone_identity(r), where)
            if len(models[k[2]]) > 1:
                (a, pa), (b, pb) = list(models[k[2]].items())[:2]
                raise ValueError(
                    f"runs of different backbones share the model label {k[2]!r}: {pa} ({_ident_text(a)}) and {pb} "
                    f"({_ident_text(b)}). A report averages the seeds of one model: report each backbone's runs "
                    f"separately (compare checkpoints with python -m value_pl.compare)")
            configs.add(k[2], r, where)
            self.chance[r["task"]] = r.get("chance", float("nan"))
            seed = int(r.get("seed", 0))
            for row in r.get("layers", []):
                cell = (k, row["name"], seed)
                if cell in src:
                    raise ValueError(f"{where} and {src[cell]}: two runs of the same configuration ({_key_text(k)}) "
                                     f"with the same seed {seed} (layer {row['name']}); pass the directories of one "
                                     f"of them")
                src[cell] = where
                self.by[k][row["name"]][seed] = row
        self.config_unknown = configs.unknown  # runs without a config record: noted under the tables, named

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


#: the control rows that are no layer, in table order (above the layers): the detector's features, the boxes alone
CONTROL_ROWS = ("raw", "boxes")


def _layer_order(name: str):
    if name in CONTROL_ROWS:
        return (-1, CONTROL_ROWS.index(name))
    m = re.match(r"layer_(\d+)$", name)
    if m:
        return (0, int(m.group(1)))
    return (1, name)


def layer_title(name: str) -> str:
    """Row titles of the paper's tables: ``Layer k`` = output of the k-th layer (the paper's Tables 3, 5, 8-11;
    two-stream columns are explained in each table's note), ``Embeddings`` = the embedding output (index 0,
    never "Layer 1"), ``Original visual emb.`` = the detector's region features, ``Box geometry only (control)`` =
    the geometry-only control (Eq. 4 on the regions' boxes alone, ``boxes``)."""
    if name == "raw":
        return "Original visual emb."
    if name == "boxes":
        return "Box geometry only (control)"
    m = re.match(r"layer_(\d+)$", name)
    if m:
        k = int(m.group(1))
        return "Embeddings" if k == 0 else f"Layer {k}"
    if name == "all_heads":
        return "All attention heads"
    return name


# ------------------------------------------------------------------ layouts
