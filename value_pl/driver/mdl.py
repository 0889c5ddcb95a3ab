"""The MDL driver (``train mdl=true``): extract features once, code every head's labels online, write results.
Sentence heads of all layers train together (``online_codelength_batched``); pair heads one after the other."""
from __future__ import annotations

import copy
import json
import time

import torch
from omegaconf import OmegaConf

from ..probers.heads import SentenceProber
from ..probers.module import layer_number
from ..protocols.batched import train_units, unit_of
from ..protocols.fitting import accuracy, extract_split, fast_dev_batches, fit_head, pick_device, take
from ..protocols.mdl import PAPER_FRACTIONS, check_fractions, mdl_rule, online_codelength, online_codelength_batched
from .results import json_safe, log_results_table, results_dict, results_markdown
from .setup import close_logger, make_logger, prepare

#: the per-layer codelengths: extra columns of the logged results table
CODE_COLUMNS = ("codelength_bits", "uniform_bits", "compression")


def train_mdl(cfg) -> dict:
    t0 = time.time()
    rdir, dm, module, spec = prepare(cfg)
    logger = make_logger(cfg, rdir)  # one process (no Lightning trainer): W&B/CSV as a Lightning run logs them
    device = pick_device(cfg)
    module.to(device)
    o = OmegaConf.to_container(cfg.get("mdl_opts") or {}, resolve=True)
    fractions = check_fractions(o.get("fractions") or PAPER_FRACTIONS)  # before the features are extracted
    quick = fast_dev_batches(cfg)
    fit = {"lr": float(o.get("lr", 1e-3)), "batch_size": int(o.get("batch_size", 64)),
           "max_epochs": 1 if quick else int(o.get("max_epochs", 20)), "patience": int(o.get("patience", 3))}
    max_train = o.get("max_train")
    xs, ys, counts = {}, {}, {}
    t_ex = time.time()
    for stage in ("train", "val", "test"):
        f, y, counts[stage] = extract_split(module, dm, stage, max_batches=quick,
                                            max_examples=int(max_train) if (stage == "train" and max_train) else None)
        xs[stage], ys[stage] = f, y
    perm = torch.randperm(ys["train"].shape[0], generator=torch.Generator().manual_seed(int(cfg.seed)))
    y_tr = ys["train"][perm]
    C = len(spec.labels)
    keys = list(module.head_names)
    heads0 = [module.head(k).cpu() for k in keys]
    x_tr = {k: take(xs["train"][k], perm) for k in keys}
    t_probe = time.time()
    if keys and all(isinstance(h, SentenceProber) for h in heads0):
        # sentence heads: every layer's probe of a block trains at once (same permutations as fit_head)
        progress = bool(cfg.get("progress", True))
        codes = online_codelength_batched(heads0, [x_tr[k][0] for k in keys], y_tr, C, fractions, seed=int(cfg.seed),
                                          device=device, progress=progress, **fit)
        res_full = train_units([x_tr[k][0] for k in keys], y_tr, [xs["val"][k][0] for k in keys], ys["val"],
                               [unit_of(h, i) for i, h in enumerate(heads0)], C, lr=fit["lr"],
                               batch_size=fit["batch_size"], rule=mdl_rule(fit["max_epochs"], fit["patience"]),
                               seed=int(cfg.seed), device=device, progress=progress, desc="MDL full probes")
        fulls = []
        for h0, r in zip(heads0, res_full):
            full = copy.deepcopy(h0)
            full.load_state_dict(r["state"])
            fulls.append(full.to(device))
    else:  # pair heads: one after the other
        codes, fulls = [], []
        for k, h0 in zip(keys, heads0):
            codes.append(online_codelength(h0, x_tr[k], y_tr, C, fractions, seed=int(cfg.seed), device=device, **fit))
            fulls.append(fit_head(copy.deepcopy(h0), x_tr[k], y_tr, xs["val"][k], ys["val"], seed=int(cfg.seed),
                                  device=device, **fit)[0])
    timing = {"extract_s": round(t_probe - t_ex, 2), "probe_s": round(time.time() - t_probe, 2)}
    rows = []
    for key, code, full in zip(keys, codes, fulls):
        name = module.display_name(key)
        rows.append({"layer": layer_number(name) if name.startswith("layer_") else -1, "name": name,
                     "title": module.backbone.layer_title(module.kind, name),
                     "val_acc": accuracy(full, xs["val"][key], ys["val"], device),
                     "test_acc": accuracy(full, xs["test"][key], ys["test"], device),
                     "codelength_bits": code["codelength_bits"], "uniform_bits": code["uniform_bits"],
                     "compression": code["compression"], "blocks": code["blocks"]})
        print(f"[value-pl] MDL {name}: {code['codelength_bits']:.1f} bits (uniform {code['uniform_bits']:.1f}), "
              f"compression {code['compression']:.2f}")
    res = results_dict(cfg, module, dm, rows=rows, counts=counts, label_counts={
        s: torch.bincount(ys[s], minlength=C).tolist() for s in ("train", "test")}, extra={
        "mdl": {"method": "online code (Voita & Titov 2020)", "fractions": list(fractions),
                "num_examples": int(y_tr.shape[0]), **fit, "fast_dev_run": bool(quick),
                "layers": {r["name"]: {k: r[k] for k in ("codelength_bits", "uniform_bits", "compression")}
                           for r in rows}},
        "timing": timing,
        "seconds": round(time.time() - t0, 1),
    })
    (rdir / "results.json").write_text(json.dumps(json_safe(res), indent=2, default=float, allow_nan=False) + "\n")
    (rdir / "mdl.json").write_text(json.dumps(json_safe(res["mdl"]), indent=2, default=float, allow_nan=False) + "\n")
    md = results_markdown(res) + "\n| layer | codelength (bits) | uniform (bits) | compression |\n|---|---:|---:|---:|\n"
    md += "".join(f"| {r['name']} | {r['codelength_bits']:.1f} | {r['uniform_bits']:.1f} | {r['compression']:.2f} |\n"
                  for r in rows)
    (rdir / "results.md").write_text(md)
    print(md)
    log_results_table(logger, res, rdir, columns=CODE_COLUMNS,
                      summary={f"mdl/{c}/{r['name']}": r[c] for r in rows for c in CODE_COLUMNS})
    close_logger(logger, cfg)
    return res
