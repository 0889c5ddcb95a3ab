"""The training-free tables from ``python -m value_pl.analyze`` runs: Table 1 (fusion NMI), Table 2 (coreference,
max attention V->T / T->V with the head), Table 4 (relations), Table 7 (the selected head vs every other phrase) and
the modality-importance numbers plotted in Figs. 2-3 (with the untrained twins of App. B as their own rows).

An analyze run writes ``<analysis>.json`` per analysis (and ``analysis.json``) into its run directory; each file
records the backbone, the data (the manifest's dataset name), the seed and ``max_samples`` (files written before
that are completed from their run's ``analysis.json``; a run whose files and ``analysis.json`` both lack
``max_samples`` is marked "cap unknown" under its tables, naming the files, not taken for an uncapped one). Runs are grouped by (analysis, model label, dataset): the
seeds of a group give mean +/- 95% CI, as in the other tables; two runs of one group with the same seed, runs
of different backbones under one model label, or of one backbone built with different model configs
(``config_sha256``), are refused with both files named (files that predate the config record: "config unknown",
named under their tables).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .collect import (ANALYSIS_FILES, ConfigCheck, Stat, Table, _ident_text, backbone_identity, config_unknown_note,
                      model_label)

#: manifest ``dataset`` -> the paper's name
DATASETS = {"flickr30k_entities": "Flickr30k", "flickr30k": "Flickr30k", "visual_genome": "Visual Genome",
            "vg": "Visual Genome", "visual_genome_mismatch": "Visual Genome (mismatched)"}
MODEL_ORDER = {"SS": 0, "TS": 1, "SS untrained": 2, "TS untrained": 3}
DATASET_ORDER = {"Flickr30k": 0, "Visual Genome": 1}
#: the paper's row order of Table 2 and column order of Table 7 (then the types the paper leaves out)
COREF_ORDER = ("people", "bodyparts", "scene", "clothing", "animals", "instruments", "vehicles", "other")
TABLE7_ORDER = ("people", "bodyparts", "scene", "clothing", "instruments", "animals", "vehicles", "other")
#: the 7 of 30 relations the paper's Table 4 shows, in its order (the others follow, most pairs first)
RELATION_ORDER = ("on", "standing in", "wearing", "playing", "eating", "holds", "covering")
#: what must agree between the seeds of one group (beside the backbone): the sample read and the method's settings
SETTINGS = ("split", "max_samples", "kmeans.n_init", "kmeans.max_iter", "tokens", "threshold", "include_special",
            "maxattn.average")
#: settings recorded in later versions: compared where both runs recorded them (``rand_iou`` draws the Rand. baselines)
SETTINGS_RECORDED = ("rand_iou", "coref_label")
#: the analyses whose means ``maxattn.average`` chooses (pairs or samples; files written before it: pairs)
MAXATTN = ("coref", "relation")


def dataset_name(rec: dict) -> str:
    d = (rec.get("data") or {}).get("dataset") or "?"
    return DATASETS.get(str(d), str(d))


def _sibling_summary(f: Path) -> dict:
    s = f.parent / "analysis.json"
    return json.loads(s.read_text()) if s.exists() else {}


def find_analysis_files(paths) -> list[Path]:
    """Every ``<analysis>.json`` of :data:`ANALYSIS_FILES` under ``paths`` (a run directory, a multirun directory,
    an ``analysis.json`` = its run's files, or one such file)."""
    out = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "analysis.json":
            out += [p.parent / f"{a}.json" for a in ANALYSIS_FILES if (p.parent / f"{a}.json").exists()]
        elif p.is_file() and p.stem in ANALYSIS_FILES:
            out.append(p)
        elif p.is_dir():
            out += [f for a in ANALYSIS_FILES for f in p.rglob(f"{a}.json")]
    return sorted(set(out))


def load_analyses(paths) -> list[dict]:
    """One record per analysis file: the file's JSON plus ``_path`` (files of skipped analyses are left out:
    they hold no numbers, and their ``.md`` says why)."""
    recs = []
    for f in find_analysis_files(paths):
        try:
            res = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
        if not isinstance(res, dict) or res.get("analysis") != f.stem:
            continue  # a file of that name that is not an analyze output (e.g. a user's own fusion.json)
        if "skipped" in res:
            continue
        summ = _sibling_summary(f)
        for k in ("data", "seed", "max_samples", "backbone", "inputs_cut"):
            if k not in res and k in summ:
                res[k] = summ[k]
        # written before analyze recorded its cap (``max_samples: null`` = the whole split): whether the run read a
        # capped sample cannot be told; said under its tables (cap unknown), never taken for uncapped
        res["_cap_unknown"] = "max_samples" not in res
        if res["analysis"] in MAXATTN and "maxattn" not in res:  # written when pairs was the only averaging
            res["maxattn"] = {"average": "pairs"}
        if "backbone" not in res or "data" not in res:
            raise ValueError(f"{f}: an analyze output without its backbone or data record (and no analysis.json "
                             f"beside it): cannot tell which model and dataset it belongs to")
        res["_path"] = str(f)
        recs.append(res)
    return recs


def _setting(res: dict, key: str):
    v = res
    for k in key.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    return v


class Analyses:
    """Per (analysis, model label, dataset): {seed: result}, checked as :class:`~.collect.Runs` checks
    ``results.json`` runs."""

    def __init__(self, recs: list[dict]):
        self.recs = recs
        self.by: dict[tuple, dict[int, dict]] = defaultdict(dict)
        models: dict[str, dict[tuple, str]] = defaultdict(dict)
        first: dict[tuple, dict] = {}
        configs = ConfigCheck("analyze runs")
        for r in recs:
            where = r["_path"]
            m = model_label(r)
            models[m].setdefault(backbone_identity(r), where)
            if len(models[m]) > 1:
                (a, pa), (b, pb) = list(models[m].items())[:2]
                raise ValueError(
                    f"analyze runs of different backbones share the model label {m!r}: {pa} ({_ident_text(a)}) and "
                    f"{pb} ({_ident_text(b)}); report each backbone's runs separately")
            configs.add(m, r, where)
            k = (r["analysis"], m, dataset_name(r))
            seed = int(r.get("seed", 0))
            if seed in self.by[k]:
                raise ValueError(f"{where} and {self.by[k][seed]['_path']}: two analyze runs of {k[0]} / {m} / {k[2]} "
                                 f"with the same seed {seed} (analyses are deterministic given the seed: one would "
                                 f"overwrite the other); pass the directories of one of them")
            r0 = first.setdefault(k, r)
            diff = [s for s in SETTINGS if _setting(r, s) != _setting(r0, s)]
            diff += [s for s in SETTINGS_RECORDED if s in r and s in r0 and r[s] != r0[s]]
            if diff:
                raise ValueError(f"{where} and {r0['_path']}: analyze runs of {k[0]} / {m} / {k[2]} differ in "
                                 + ", ".join(f"{s} {_setting(r0, s)!r} vs {_setting(r, s)!r}" for s in diff)
                                 + "; the seeds of a cell must differ only in their seed: report them separately")
            self.by[k][seed] = r
        self.config_unknown = set(configs.unknown)  # files without a config record: named under their tables

    def groups(self, analysis: str) -> list[tuple[str, str, list[dict]]]:
        """(model, dataset, the seeds' results) of one analysis, in the paper's order (SS, TS, then untrained)."""
        ks = [k for k in self.by if k[0] == analysis]
        ks.sort(key=lambda k: (MODEL_ORDER.get(k[1], 9), k[1], DATASET_ORDER.get(k[2], 9), k[2]))
        return [(m, d, [self.by[k][s] for s in sorted(self.by[k])]) for (_, m, d) in ks for k in [(analysis, m, d)]]

    def notes(self, *analyses: str) -> str:
        """What is not a result among the runs behind a table (counted per run directory): capped samples
        (``max_samples``), synthetic demo shards, inputs cut to the backbone's limits; and the runs whose cap is
        unknown (files written before ``max_samples`` was recorded), named."""
        runs: dict[str, dict] = {}
        for (a, _, _), d in self.by.items():
            if a in analyses:
                for r in d.values():
                    runs.setdefault(str(Path(r["_path"]).parent), r)
        capped = [(p, r) for p, r in runs.items() if is_capped(r)]
        demo = [p for p, r in runs.items() if (r.get("data") or {}).get("synthetic")]
        cut = [(p, r["inputs_cut"]) for p, r in runs.items()
               if (r.get("inputs_cut") or {}).get("texts") or (r.get("inputs_cut") or {}).get("regions")]
        unknown = sorted(r["_path"] for r in runs.values() if r.get("_cap_unknown"))
        no_config = [r["_path"] for r in runs.values() if r["_path"] in self.config_unknown]
        why = []
        if capped:
            p, r = capped[0]
            why.append(f"{len(capped)} analysed a capped sample (max_samples={r.get('max_samples')}, "
                       f"{r.get('samples_seen')} of {(r.get('data') or {}).get('split_samples') or '?'} samples, e.g. {p})")
        if demo:
            why.append(f"{len(demo)} read synthetic demo shards (e.g. {demo[0]})")
        out = [f"**Not a result:** of the {len(runs)} analyze runs, " + "; ".join(why) + "."] if why else []
        if unknown:
            out.append(f"**Cap unknown:** {len(unknown)} of the {len(runs)} analyze runs were written before analyze "
                       f"recorded max_samples, so whether they read the whole split or a capped sample cannot be "
                       f"told (run them again to know): " + ", ".join(unknown) + ".")
        if no_config:
            out.append(config_unknown_note(no_config, len(runs), "analyze runs"))
        if cut:
            p, c = cut[0]
            out.append(f"**Inputs cut:** {len(cut)} of the {len(runs)} analyze runs saw inputs cut to the backbone's "
                       f"limits (e.g. {p}: {c.get('texts')} text(s) over max_text_len={c.get('max_text_len')}, "
                       f"{c.get('regions')} sample(s) over max_regions={c.get('max_regions')}).")
        return "\n\n".join(out)


def is_capped(res: dict) -> bool:
    """A run that read only ``max_samples`` samples of a larger (or unknown-size) split."""
    cap = res.get("max_samples")
    total = (res.get("data") or {}).get("split_samples")
    return cap is not None and (total is None or int(cap) < int(total))


def _stat(values: list, heads: list | None = None) -> Stat | None:
    vals = [float(v) for v in values if v is not None and v == v]
    if not vals:
        return None
    tag = "/".join(dict.fromkeys(h for h in heads or [] if h)) if heads else ""
    return Stat(vals, tag=tag)


def _best(rs: list[dict], get) -> Stat | None:
    """A max-attention cell over seeds: the mean of each seed's maximum, tagged with the head(s) (layer-head)."""
    ds = [get(r) for r in rs]
    ds = [d for d in ds if d]
    return _stat([d["value"] for d in ds], [d["head"] for d in ds]) if ds else None


def _ordered(names, known) -> list[str]:
    return [t for t in known if t in names] + [t for t in names if t not in known]


def _types(rs: list[dict]) -> dict[str, list[dict]]:
    """type -> the seeds' rows of that type."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rs:
        for row in r.get("types", []):
            out[row["type"]].append(row)
    return out


def _ds_suffix(ds: str, home: str) -> str:
    return "" if ds == home else f", {ds}"


def _over(A: Analyses, analysis: str) -> str:
    """What the max-attention means of a table's groups are over (``maxattn.average``), in words; per group when
    they differ (each group's seeds agree: :data:`SETTINGS`)."""
    words = {"pairs": "over linked pairs", "samples": "over samples of each sample's mean over its linked pairs"}
    got = {f"{m} / {ds}": _setting(rs[0], "maxattn.average") for m, ds, rs in A.groups(analysis)}
    kinds = set(got.values())
    if len(kinds) <= 1:
        return words.get(next(iter(kinds), "pairs"), "over linked pairs")
    return "(" + "; ".join(f"{g}: {words.get(v, v)}" for g, v in got.items()) + ")"


def table1(A: Analyses) -> Table:
    t = Table("table1", "Table 1: multimodal fusion degree (NMI; lower = more fused)", scale=1.0)
    groups = A.groups("fusion")
    labels = {row["table1"] for _, _, rs in groups for r in rs for row in r["layers"]}
    n = max([12] + [int(x) + 1 for x in labels if str(x).isdigit()])
    t.cols = [str(i) for i in range(n)]
    for m, ds, rs in groups:
        row = f"{m} / {ds}"
        t.rows.append(row)
        for c in t.cols:
            s = _stat([next((x["nmi"] for x in r["layers"] if x["table1"] == c), None) for r in rs])
            t.cells[(row, c)] = s if s else "–"
    t.note = ("Layers in the paper's Table 1 numbering: 0 = the first Transformer layer; SS = single-stream (every "
              "layer), TS = two-stream (its cross-modality layers only: LXMERT has 5, the rest '–'). The embedding "
              "output (`emb.` in fusion.json) is not in the paper's table.")
    return t


def table2(A: Analyses) -> Table:
    t = Table("table2", "Table 2: visual coreference, maximum attention between linked tokens (head: layer-head)",
              scale=1.0, digits=3)
    cols = (("V→T", "vt"), ("T→V", "tv"), ("V→T (Rand.)", "vt_rand"), ("T→V (Rand.)", "tv_rand"))
    t.cols = [c for c, _ in cols] + ["pairs"]
    for m, ds, rs in A.groups("coref"):
        by = _types(rs)
        for ty in _ordered(list(by), COREF_ORDER):
            row = f"{m}{_ds_suffix(ds, 'Flickr30k')}: {ty}"
            t.rows.append(row)
            for c, k in cols:
                s = _best(by[ty], lambda x, k=k: x.get(k))
                t.cells[(row, c)] = s if s else "–"
            t.cells[(row, "pairs")] = " / ".join(str(x["pairs"]) for x in by[ty])
    t.note = ("Rows: the model (SS = single-stream: all joint self-attention maps; TS = two-stream: the cross maps), "
              f"then the coarse coreference type. A cell is the maximum over heads of the mean {_over(A, 'coref')} "
              "(averaged over seeds), with the arg-max head; pairs per seed.")
    return t


def table4(A: Analyses) -> Table:
    t = Table("table4", "Table 4: visual relations, maximum attention between two visual tokens", scale=1.0, digits=3)
    groups = A.groups("relation")
    by_group = {}
    counts: dict[str, int] = defaultdict(int)
    for m, ds, rs in groups:
        col = f"{m}{_ds_suffix(ds, 'Visual Genome')}"
        t.cols += [col, f"{col} (Rand.)"]
        by_group[col] = _types(rs)
        for ty, rows in by_group[col].items():
            counts[ty] += rows[0]["pairs"]
    for ty in _ordered(sorted(counts, key=lambda x: (-counts[x], x)), RELATION_ORDER):
        t.rows.append(ty)
        for col, by in by_group.items():
            for c, k in ((col, "max"), (f"{col} (Rand.)", "rand")):
                s = _best(by.get(ty, []), lambda x, k=k: x.get(k))
                t.cells[(ty, c)] = s if s else "–"
    t.note = ("Mean of subject→object and object→subject attention (SS: joint maps; TS: the visual stream's "
              f"self-attention), then the mean {_over(A, 'relation')}, maximum over heads, with the head. The "
              "paper's Table 4 shows 7 of the 30 relations (on, "
              "standing in, wearing, playing, eating, holds, covering): those come first, the others follow.")
    return t


def table7(A: Analyses) -> Table:
    t = Table("table7", "Table 7: does the head selected for a coreference type prefer the linked pair?", scale=1.0)
    groups = A.groups("coref")
    types = {ty for _, _, rs in groups for ty in _types(rs)}
    t.cols = _ordered(sorted(types), TABLE7_ORDER)
    for m, ds, rs in groups:
        row = f"Ratio ({m}{_ds_suffix(ds, 'Flickr30k')})"
        t.rows.append(row)
        by = _types(rs)
        for ty in t.cols:
            s = _best(by.get(ty, []), lambda x: {"value": x["table7"]["ratio"], "head": x["table7"]["head"]}
                      if x.get("table7") else None)
            t.cells[(row, ty)] = s if s else "–"
    t.note = ("Share of linked pairs for which the type's V→T head of Table 2 (in brackets) gives the linked phrase "
              "more attention than every other phrase of the sample.")
    return t


def table_modality(A: Analyses) -> list[Table]:
    """Fig. 3a (per layer, with the overall scores: App. B's untrained 0.66/0.28 is the untrained row's mean per
    head) and Fig. 2 / Fig. 3b (per head) as tables."""
    layers = Table("modality", "Figs. 2-3: modality importance of [CLS] per layer (Eq. 1) and image-to-text heads",
                   scale=1.0, digits=3)
    heads = Table("modality_heads", "Figs. 2 and 3b: modality importance and P(image-to-text) per head "
                  "(layer-head)", scale=1.0, digits=3)
    for m, ds, rs in A.groups("modality"):
        tag = f"{m}{_ds_suffix(ds, 'Flickr30k')}"
        for key, name in (("text", "text MI"), ("image", "image MI")):
            col = f"{name} ({tag})"
            for li in range(max(len(r["layers"]) for r in rs)):
                layers.put(f"Layer {li + 1}", col, _stat([r["layers"][li][key] for r in rs if li < len(r["layers"])]))
            layers.put("overall (mean per head)", col, _stat([r["overall"][f"{key}_mean"] for r in rs]))
            layers.put("overall (sum over heads)", col, _stat([r["overall"][f"{key}_sum"] for r in rs]))
            for li, hs in enumerate(rs[0]["heads"][key]):
                for hi in range(len(hs)):
                    heads.put(f"{li + 1}-{hi + 1}", col, _stat([r["heads"][key][li][hi] for r in rs]))
    for m, ds, rs in A.groups("i2t"):
        col = f"P(image-to-text) ({m}{_ds_suffix(ds, 'Flickr30k')})"
        layers.put("share of heads with P > 0.5", col, _stat([r["share_above_0.5"] for r in rs]))
        layers.put("max P", col, _stat([r["max"] for r in rs], [r["argmax"] for r in rs]))
        for li, hs in enumerate(rs[0]["heads"]):
            for hi in range(len(hs)):
                heads.put(f"{li + 1}-{hi + 1}", col, _stat([r["heads"][li][hi] for r in rs]))
    for tab in (layers, heads):
        tab.cells = {k: v for k, v in tab.cells.items() if v is not None}
    layers.note = ("Single-stream models only (a two-stream model has no joint [CLS] attention). MI = the [CLS] "
                   "token's attention mass on text tokens / on regions ([CLS]/[SEP] excluded), mean over samples.")
    return [layers, heads]


def build_analysis_tables(A: Analyses, name: str) -> list[Table]:
    make = {"table1": (lambda: [table1(A)], "fusion"), "table2": (lambda: [table2(A)], "coref"),
            "table4": (lambda: [table4(A)], "relation"), "table7": (lambda: [table7(A)], "coref"),
            "modality": (lambda: table_modality(A), "modality")}
    fn, analysis = make[name]
    tables = fn()
    note = A.notes(analysis, "i2t") if name == "modality" else A.notes(analysis)
    for t in tables:
        if note:
            t.note = f"{t.note}\n\n{note}" if t.note else note
    return tables
