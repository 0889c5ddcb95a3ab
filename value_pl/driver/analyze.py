"""The analysis driver (``python -m value_pl.analyze``): run the training-free analyses over a shard split with a frozen backbone (one streaming pass).

Every batch is collated once (:class:`~.pairs.AnalysisCollator`); each analysis asks the backbone
for only what it needs (:class:`~value_pl.backbones.capture.CaptureSpec`) and keeps running sums, so
memory is bounded by one batch whatever the number of samples.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..analysis import ANALYSES, MISSING_PREFIX, Unsupported
from ..analysis.common import merge_captures
from ..analysis.pairs import AnalysisCollator
from ..backbones import build_backbone
from ..backbones.checks import check_inputs
from ..data.progress import progress
from ..data.safe_load import honours_switch
from .results import backbone_record
from .setup import close_logger, make_datamodule, make_logger, run_dir, teardown_distributed
from .validate import check_analyze

log = logging.getLogger("value_pl")

def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def raw_batches(dm, stage: str, batch_size: int, num_workers: int, limit: int | None = None):
    """Decoded samples of one split, in lists of ``batch_size`` (collated later, in this process); every
    sample once over ranks and workers, whatever the number of shards; ``limit`` (``max_samples``): the split's
    first ``limit`` samples, the same ones whatever the number of workers (they read them in another order)."""
    return dm.loader(stage, train=False, collate=list, batch_size=int(batch_size), num_workers=int(num_workers or 0),
                     limit=limit)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def build_analyses(names: list[str], backbone, cfg, strict: bool):
    out, skipped = [], {}
    for n in names:
        if n not in ANALYSES:
            raise KeyError(f"unknown analysis {n!r}; known: {', '.join(ANALYSES)} (or analysis=all)")
        try:
            out.append(ANALYSES[n](backbone, cfg))
        except Unsupported as e:
            if strict:
                raise
            skipped[n] = str(e)
            print(f"[value-pl] skipping {n}: {e}")
    return out, skipped


def header(a_name: str, ident: dict, cfg, samples: int, synthetic: bool, cut: dict | None = None) -> str:
    state = "pretrained" if ident.get("pretrained") else "untrained"
    h = (f"# {a_name} / backbone={ident.get('name')} ({state}, {ident.get('family')}) / data={cfg.data.get('name')} "
         f"split={cfg.split} / {samples} samples\n\n")
    if synthetic:
        h += "_Demo shards: synthetic scenes with planted signal -- a smoke test, not a result._\n\n"
    if cut and (cut["texts"] or cut["regions"]):
        h += (f"Inputs cut by the backbone's limits: {cut['texts']} text(s) longer than max_text_len={cut['max_text_len']} "
              f"tokens (the rest not seen), {cut['regions']} sample(s) with more than max_regions={cut['max_regions']} "
              "regions (the first kept).\n\n")
    return h


def log_wandb(logger, payload: dict, figs: list, rdir: Path, name: str) -> None:
    """An analysis's figures, tables and lines on a W&B run; nothing for another logger (``logger=csv``: the run
    directory's ``<analysis>.json``/``.md``/``.png`` are its tables)."""
    from pytorch_lightning.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    try:
        import wandb

        exp = logger.experiment
        for f in figs:
            exp.log({f"{name}/{f.name}": wandb.Image(str(rdir / f"{f.name}.png"), caption=f.title)})
        for key, (cols, rows) in payload.get("tables", {}).items():
            logger.log_table(key=key, columns=cols, data=rows)
        for key, (xs, series, xname) in payload.get("lines", {}).items():
            exp.log({key: wandb.plot.line_series(xs=list(xs), ys=[list(v) for v in series.values()],
                                                 keys=list(series), title=key, xname=xname)})
    except Exception as e:  # noqa: BLE001 - a dashboard must never fail a run
        log.warning("could not log %s to W&B: %s", name, e)


@honours_switch
def analyze(cfg: DictConfig) -> dict:
    t0 = time.time()
    check_analyze(cfg)  # value ranges, before any file is read
    torch.manual_seed(int(cfg.seed))
    rdir = run_dir(cfg)
    dm = make_datamodule(cfg)
    split = str(cfg.get("split", "test"))
    dm.splits.setdefault(split, split)
    backbone = build_backbone(cfg.backbone, img_dim=dm.manifest.get("feature_dim"))
    check_inputs(backbone, dm.manifest, dm.root)  # before the first batch: widths, boxes, vocabulary, positions
    ident = backbone_record(backbone)  # with its model config: the report checks that the seeds of a cell agree
    device = pick_device(cfg.get("device"))
    backbone.to(device)
    print(f"[value-pl] backbone {ident.get('name')}: {ident.get('source')} ({backbone.kind}-stream) on {device}")
    synthetic = bool(dm.manifest.get("synthetic", False))
    if synthetic:
        print("[value-pl] data: synthetic demo shards with planted signal (a smoke test, not a result)")
    names = list(OmegaConf.to_container(cfg.analysis.run, resolve=True))
    analyses, skipped = build_analyses(names, backbone, cfg, strict=len(names) == 1)
    collate = AnalysisCollator(backbone.collator(), seed=int(cfg.seed),
                               coref_label=cfg.get("coref_label", "coref"), rand_iou=cfg.get("rand_iou", 0.5))
    limit = cfg.get("max_samples")
    total = dm.num_samples(split) if split in dm.manifest["splits"] else None
    split_samples = total
    if limit:
        total = min(int(limit), total) if total else int(limit)
    bs = int(cfg.batch_size)
    workers = cfg.get("num_workers")
    workers = cfg.data.get("num_workers", 0) if workers is None else workers
    bar = progress(total=total, enabled=bool(cfg.get("progress", True)), unit="sample", desc="analyze")
    seen = 0
    missing: dict[str, int] = {}
    # inputs the collator cut to the backbone's limits: every analysis sees the cut sequence, so it is reported
    cut = {"texts": 0, "regions": 0, "max_text_len": int(backbone.text_limit), "max_regions": int(backbone.max_regions)}
    with torch.no_grad():
        for samples in raw_batches(dm, split, bs, workers, int(limit) if limit else None):
            if limit:
                samples = samples[: max(int(limit) - seen, 0)]
            if not samples:
                break
            batch = collate(samples)
            for k, v in batch.pop("analysis_missing").items():
                missing[k] = missing.get(k, 0) + v
            counts = batch.get("counts") or {}
            cut["texts"] += int(counts.get("texts_truncated", 0))
            cut["regions"] += int(counts.get("regions_truncated", 0))
            batch["_offset"] = seen
            batch = to_device(batch, device)
            want = [(a, a.capture(batch)) for a in analyses]
            want = [(a, s) for a, s in want if s is not None]
            if want:  # one forward pass per batch serves every analysis
                spec = merge_captures([s for _, s in want])
                if spec.rows:
                    spec.rows = {m: r.to(device) for m, r in spec.rows.items()}
                out = backbone(batch, spec)
                for a, _ in want:
                    a.update(out, batch)
            seen += len(samples)
            bar.update(len(samples))
            if limit and seen >= int(limit):
                break
    bar.close()
    for a in analyses:
        pre = MISSING_PREFIX.get(a.name)
        if pre:
            for k, v in missing.items():
                if k.startswith(pre):
                    a.count(k, v)

    logger = make_logger(cfg, rdir)
    # what python -m value_pl.report needs of each run (value_pl/report/analyses.py): which model, which data,
    # which seed, and whether it read a capped sample (max_samples) or cut inputs
    data = {"root": str(dm.root), "dataset": dm.manifest.get("dataset"), "split": split, "synthetic": synthetic,
            "split_samples": split_samples}
    run = {"data": data, "seed": int(cfg.seed), "max_samples": int(limit) if limit else None,
           # what the collator's Rand. baselines and coreference labels were drawn with (the seeds of a report cell
           # must agree on them: value_pl.report.analyses)
           "rand_iou": cfg.get("rand_iou", 0.5), "coref_label": cfg.get("coref_label", "coref")}
    summary = {"analyses": [a.name for a in analyses], "skipped": skipped, "backbone": ident, **run,
               "samples": seen, "device": str(device), "inputs_cut": cut, "outputs": {}}
    for a in analyses:
        res = a.result()
        res.update(backbone=ident, split=split, samples_seen=seen, inputs_cut=cut, **run)
        figs = a.figures(res, rdir)
        (rdir / f"{a.name}.json").write_text(json.dumps(res, indent=1, default=float, allow_nan=True) + "\n")
        md = header(a.name, ident, cfg, seen, synthetic, cut) + a.markdown(res)
        (rdir / f"{a.name}.md").write_text(md)
        print(md)
        summary["outputs"][a.name] = [f"{a.name}.json", f"{a.name}.md"] + [f"{f.name}.png" for f in figs]
        if logger:
            log_wandb(logger, a.wandb_payload(res), figs, rdir, a.name)
    for n, why in skipped.items():
        (rdir / f"{n}.json").write_text(json.dumps({"analysis": n, "skipped": why}, indent=1) + "\n")
        (rdir / f"{n}.md").write_text(f"# {n}\n\nNot run: {why}.\n")
    summary["seconds"] = round(time.time() - t0, 1)
    (rdir / "analysis.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print(f"[value-pl] {seen} samples, {len(analyses)} analyses in {summary['seconds']} s -> {rdir}")
    close_logger(logger, cfg)
    teardown_distributed()
    return summary
