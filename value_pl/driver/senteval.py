"""The SentEval driver (``train task=<sentence task> prober=senteval_*``): features once, then the whole grid of
every layer in one batched run (:func:`value_pl.protocols.senteval.probe_layers`)."""
from __future__ import annotations

import time

import torch

from omegaconf import OmegaConf

from ..probers.module import layer_number
from ..protocols.fitting import extract_split, fast_dev_batches, pick_device
from ..protocols.senteval import grid_of, probe_layers
from .results import log_results_table, results_dict, write_results
from .setup import close_logger, make_logger, prepare

#: the per-layer configuration SentEval's grid selected on dev accuracy: extra columns of the logged results table
SELECTED = ("nhid", "dropout", "l2", "passes")


def train_senteval(cfg) -> dict:
    t0 = time.time()
    rdir, dm, module, spec = prepare(cfg)
    logger = make_logger(cfg, rdir)  # one process (no Lightning trainer): W&B/CSV as a Lightning run logs them
    device = pick_device(cfg)
    module.to(device)
    prober = OmegaConf.to_container(cfg.prober, resolve=True)
    task = OmegaConf.to_container(cfg.task, resolve=True)
    quick = fast_dev_batches(cfg)
    opts = {"lr": float(prober.get("lr", 1e-3)), "batch_size": int(prober.get("batch_size", 64)),
            "tenacity": int(prober.get("tenacity", 5)), "epoch_size": int(prober.get("epoch_size", 4)),
            "max_epoch": int(prober.get("max_epoch", 200))}
    if quick:
        opts.update(epoch_size=1, max_epoch=1)
    grid = grid_of(prober, task, quick=bool(quick))
    keys = list(module.head_names)
    print(f"[value-pl] SentEval protocol: {len(grid)} configuration(s) x {len(keys)} layer(s), trained together "
          f"on {device.type}, {opts}")
    t_ex = time.time()
    splits, counts = {}, {}
    for stage in ("train", "val", "test"):
        f, y, counts[stage] = extract_split(module, dm, stage, max_batches=quick)
        splits[stage] = ([f[k][0] for k in keys], y)
    t_probe = time.time()
    C = len(spec.labels)
    seed = int(prober.get("seed", 1111)) + int(cfg.seed)
    results = probe_layers(splits["train"], splits["val"], splits["test"], C, grid, opts, seed, keys, device,
                           progress=bool(cfg.get("progress", True)))
    timing = {"extract_s": round(t_probe - t_ex, 2), "probe_s": round(time.time() - t_probe, 2)}
    rows = []
    for key, r in zip(keys, results):
        name = module.display_name(key)
        rows.append({"layer": layer_number(name), "name": name,
                     "title": module.backbone.layer_title("sentence", name), **r})
        print(f"[value-pl] {name}: dev {100 * r['val_acc']:.2f} test {100 * r['test_acc']:.2f} "
              f"(nhid {r['nhid']}, dropout {r['dropout']}, l2 {r['l2']}, {r['passes']} passes)")
    print(f"[value-pl] SentEval timing: features {timing['extract_s']} s, grid {timing['probe_s']} s")
    res = results_dict(cfg, module, dm, rows=rows, counts=counts, label_counts={
        s: torch.bincount(splits[s][1], minlength=C).tolist() for s in ("train", "test")}, extra={
        "protocol": {"name": "senteval", "representation": "mean over word tokens per layer",
                     "grid_size": len(grid), **opts, "seed": seed, "fast_dev_run": bool(quick),
                     "training": "all configurations of all layers batched (value_pl/protocols/batched.py)"},
        "timing": timing,
        "seconds": round(time.time() - t0, 1),
    })
    write_results(rdir, res)
    log_results_table(logger, res, rdir, columns=SELECTED)
    close_logger(logger, cfg)
    return res
