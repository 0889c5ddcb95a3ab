"""The paper's table layouts (Tables 3, 5, 6, 8-11, Fig. 4a, selectivity, MDL) built from collected runs, and the
dispatch to the training-free ones (Tables 1, 2, 4, 7, Figs. 2-3: :mod:`.analyses`)."""
from __future__ import annotations

import re

from .analyses import Analyses, build_analysis_tables
from .collect import (ANALYSIS_LAYOUTS, CONTROL_ROWS, LAYOUTS, PAIR_TASKS, SENT_TASKS, TASK_TITLES, Runs, Stat, Table,
                      _layer_order, config_unknown_note, layer_title)

#: what the two-stream (LXMERT) rows are, in the paper's numbering
NOTE_TS_CROSS = ("TS: Layer 1-5 are LXMERT's 5 cross-modality layers, numbered 0-4 in the paper's Table 1 "
                 "(Layer k = cross layer k-1 there).")
NOTE_TS_VISUAL = ("TS: Embeddings = the visual embedding output; Layer 1-5 = LXMERT's visual (r-) layers; "
                  "Layer 6-10 = its cross-modality layers, numbered 0-4 in the paper's Table 1.")
NOTE_TS_LANG = "TS: LXMERT's 9 language layers (L1-L9); Embeddings / Emb. = the text embedding output."


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
            if keep_layers is not None and k not in keep_layers and layer not in CONTROL_ROWS:
                continue  # a control row (the boxes alone) stays beside the kept layers
            s = R.stat(task, "layer_emb", m, layer)
            if s:
                t.put(layer_title(layer), col, s)
    controls = [layer_title(n) for n in CONTROL_ROWS]
    t.rows = sorted(t.rows, key=lambda r: (r != "All attention heads", r != "Random guess", r not in controls,
                                           controls.index(r) if r in controls else 0,
                                           int(r.split()[-1]) if r.startswith("Layer ") else 0))
    if "TS" in models:
        t.note = NOTE_TS_CROSS
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
    order = {layer_title(n): _layer_order(n) for n in [*CONTROL_ROWS] + [f"layer_{i:02d}" for i in range(64)]}
    t.rows = sorted(t.rows, key=lambda r: order.get(r, (2, r)))
    if model == "TS":
        t.note = NOTE_TS_VISUAL
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
        t = Table("table5", "Table 5: linguistic probing, test accuracy of the layer with the best dev accuracy "
                            "(Ln: layer chosen on dev)")
        for m in R.models():
            for task in tasks:
                p = _sent_prober(R, task, m)
                if p is None:
                    continue
                best = None  # (layer, mean dev accuracy over seeds): selection never looks at test
                for layer in R.layers(task, p, m):
                    if _layer_order(layer)[0] != 0 or _layer_order(layer)[1] == 0:
                        continue  # the paper's best of Layers 1..L: not the embedding output (Table 11's rows)
                    dev = R.stat(task, p, m, layer, field="val_acc")
                    if dev and (best is None or dev.mean > best[1]):
                        best = (layer, dev.mean)
                s = R.stat(task, p, m, best[0]) if best else None
                if s:
                    k = _layer_order(best[0])[1]
                    t.put(m, TASK_TITLES[task], Stat(s.values, tag="Emb." if k == 0 else f"L{k}"))
        t.note = ("Per model and task the layer is the one of Layers 1..L (as the paper: not the embedding output) "
                  "with the highest mean dev (validation) accuracy over seeds; the cell is that layer's test accuracy. "
                  + (NOTE_TS_LANG if "TS" in R.models() else ""))
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
    if "TS" in R.models():
        t.note = NOTE_TS_LANG
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


def build_tables(runs: list[dict], layout: str = "auto", analyses: list[dict] | None = None) -> list[Table]:
    """The tables of ``layout`` from ``results.json`` runs (:func:`~.collect.load_runs`) and analyze runs
    (:func:`~.analyses.load_analyses`)."""
    R = Runs(runs)
    A = Analyses(analyses or [])
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
        **{n: (lambda n=n: build_analysis_tables(A, n)) for n in ANALYSIS_LAYOUTS},
    }
    names = [n for n in LAYOUTS if n not in ("table9", "table10")] if layout == "auto" else layout.split(",")
    out, seen, from_results = [], set(), []
    for n in names:
        if n not in make:
            raise ValueError(f"unknown layout {n!r}; one of auto, {', '.join(LAYOUTS)}")
        for t in make[n]():
            if t.name not in seen and (not t.empty() or layout != "auto"):
                seen.add(t.name)
                out.append(t)
                if n not in ANALYSIS_LAYOUTS:
                    from_results.append(t)
    if R.smoke:  # said under every table of them, so that no such table is copied without it
        warn = (f"**Not a result:** {len(R.smoke)} of the {len(runs)} runs are smoke tests (fast_dev_run, "
                f"limit_*_batches or data.train_batches), e.g. {R.smoke[0]}.")
        for t in from_results:
            t.note = f"{t.note}\n\n{warn}" if t.note else warn
    if R.synthetic:
        warn = (f"**Not a result:** {len(R.synthetic)} of the {len(runs)} runs read synthetic demo shards, e.g. "
                f"{R.synthetic[0]}.")
        for t in from_results:
            t.note = f"{t.note}\n\n{warn}" if t.note else warn
    unknown = config_unknown_note(R.config_unknown, len(runs))  # results written before config_sha256: named
    if unknown:
        for t in from_results:
            t.note = f"{t.note}\n\n{unknown}" if t.note else unknown
    return out
