"""The SentEval driver (``train task=<sentence task> prober=senteval_*``): features once, the grid per layer."""
from __future__ import annotations

import time

from omegaconf import OmegaConf

from ..probers.module import layer_number
from ..protocols.fitting import extract_split, fast_dev_batches, pick_device
from ..protocols.senteval import grid_of, probe_layer
from .results import results_dict, write_results
from .setup import prepare


def train_senteval(cfg) -> dict:
    t0 = time.time()
    rdir, dm, module, spec = prepare(cfg)
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
    print(f"[value-pl] SentEval protocol: {len(grid)} configuration(s) per layer, {opts}")
    splits = {}
    dropped = 0
    for stage in ("train", "val", "test"):
        f, y, d = extract_split(module, dm, stage, max_batches=quick)
        splits[stage] = (f, y)
        dropped += d
    C = len(spec.labels)
    rows = []
    seed = int(prober.get("seed", 1111)) + int(cfg.seed)
    for key in module.head_names:
        r = probe_layer(splits["train"][0][key][0], splits["train"][1], splits["val"][0][key][0], splits["val"][1],
                        splits["test"][0][key][0], splits["test"][1], C, grid, opts, seed, key, device)
        name = module.display_name(key)
        rows.append({"layer": layer_number(name), "name": name,
                     "title": module.backbone.layer_title("sentence", name), **r})
        print(f"[value-pl] {name}: dev {100 * r['val_acc']:.2f} test {100 * r['test_acc']:.2f} "
              f"(nhid {r['nhid']}, dropout {r['dropout']}, l2 {r['l2']})")
    res = results_dict(cfg, module, dm, rows=rows, pairs_dropped=dropped, extra={
        "protocol": {"name": "senteval", "representation": "mean over word tokens per layer",
                     "grid_size": len(grid), **opts, "seed": seed, "fast_dev_run": bool(quick)},
        "seconds": round(time.time() - t0, 1),
    })
    write_results(rdir, res)
    return res
