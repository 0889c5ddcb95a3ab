"""The work behind the thin entry points ``train`` and ``eval`` (importable and testable)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from .backbones import build_backbone
from .data.collate import TaskSpec
from .data.datamodule import ShardDataModule
from .data.schema import pair_kind
from .probers.module import ProbeModule

log = logging.getLogger("value_pl")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def run_dir(cfg: DictConfig) -> Path:
    d = cfg.get("run_dir")
    if not d:
        try:
            from hydra.core.hydra_config import HydraConfig

            d = HydraConfig.get().runtime.output_dir
        except Exception:  # noqa: BLE001 - outside Hydra
            d = "runs/manual"
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


def ensure_demo(root: str | Path, data_cfg) -> None:
    """Build the demo shards on first use (they are deterministic: same bytes as the committed ones)."""
    root = Path(root)
    if not (root / "manifest.json").exists() and data_cfg.get("name") == "demo":
        from .data.demo import build_demo

        print(f"[value-pl] {root} missing: writing the synthetic demo shards (python -m value_pl.data.demo)")
        build_demo(root, seed=int(data_cfg.get("demo_seed", 0)))


def make_datamodule(cfg: DictConfig) -> ShardDataModule:
    d = cfg.data
    decode = None
    root = d.root
    if d.get("cache"):  # a feature cache (python -m value_pl.extract) instead of the shards
        from .data.cache import decode_record, open_cache

        root = d.cache
        open_cache(root)
        decode = decode_record
    else:
        ensure_demo(d.root, d)
    return ShardDataModule(root=root, batch_size=d.batch_size, num_workers=d.num_workers,
                           shuffle_buffer=d.get("shuffle_buffer", 256), seed=cfg.seed,
                           splits=OmegaConf.to_container(d.splits) if d.get("splits") else None,
                           train_batches=d.get("train_batches"), eval_batch_size=d.get("eval_batch_size"),
                           auto_workers=bool(d.get("auto_workers", False)), decode=decode)


def task_spec(cfg: DictConfig, dm: ShardDataModule) -> TaskSpec:
    name = cfg.task.name
    kind = cfg.task.get("kind") or pair_kind(name)
    labels = cfg.task.get("labels")
    if labels is None:
        labels = dm.manifest["labels"].get(name)
        if labels is None:
            raise KeyError(f"{dm.root}/manifest.json has no labels for task {name!r} "
                           f"(has {sorted(dm.manifest['labels'])})")
    return TaskSpec(name=name, kind=kind, labels=list(labels))


def make_relabel(cfg: DictConfig, spec: TaskSpec, dm: ShardDataModule):
    """Label transform at collate time: ``shuffle_labels=true`` (sanity baseline) or ``control=true``."""
    if cfg.get("shuffle_labels", False):
        from .data.relabel import ShuffledLabels

        return ShuffledLabels(dm.label_counts(spec.name, "train"), seed=int(cfg.seed))
    if not cfg.get("control", False):
        return None
    from .tasks.control import ControlRelabel  # issue: control tasks

    return ControlRelabel.from_config(cfg, spec, dm)


def make_logger(cfg: DictConfig, rdir: Path):
    lc = cfg.get("logger")
    if not lc or lc.get("name") in (None, "none"):
        return False
    name = lc.name
    if name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(rdir), name="csv", version="")
    if name == "wandb":
        os.environ.setdefault("WANDB_MODE", lc.get("mode", "offline"))
        os.environ.setdefault("WANDB_DIR", str(rdir))
        os.environ.setdefault("WANDB_CACHE_DIR", str(rdir / "wandb-cache"))
        os.environ.setdefault("WANDB_CONFIG_DIR", str(rdir / "wandb-config"))
        os.environ.setdefault("WANDB_SILENT", "true")
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(project=lc.get("project", "value-pl"), name=lc.get("run_name"),
                           group=lc.get("group"), save_dir=str(rdir), offline=lc.get("mode", "offline") == "offline",
                           config=OmegaConf.to_container(cfg, resolve=True))
    raise ValueError(f"unknown logger {name!r} (wandb, csv, none)")


def make_trainer(cfg: DictConfig, rdir: Path, logger, callbacks=None) -> pl.Trainer:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t.pop("name", None)
    if t.get("strategy") == "ddp" and t.get("accelerator") == "cpu":
        from pytorch_lightning.strategies import DDPStrategy

        t["strategy"] = DDPStrategy(process_group_backend="gloo")
    return pl.Trainer(default_root_dir=str(rdir), logger=logger, callbacks=callbacks or [],
                      enable_model_summary=False, **t)


def build_module(cfg: DictConfig, dm: ShardDataModule, backbone=None):
    spec = task_spec(cfg, dm)
    if backbone is None:
        backbone = build_backbone(cfg.backbone, img_dim=dm.manifest.get("feature_dim"))
    relabel = make_relabel(cfg, spec, dm)
    dm.collate = backbone.collator(spec, relabel=relabel)
    layers = cfg.get("layers")
    layers = None if layers in (None, "all") else [l if isinstance(l, str) else f"layer_{int(l):02d}"
                                                   for l in OmegaConf.to_container(layers)]
    module = ProbeModule(backbone, task={"name": spec.name, "kind": spec.kind, "labels": spec.labels},
                         prober=OmegaConf.to_container(cfg.prober, resolve=True),
                         optim=OmegaConf.to_container(cfg.optim, resolve=True), layers=layers, seed=cfg.seed,
                         backbone_cfg=OmegaConf.to_container(cfg.backbone, resolve=True),
                         raw_baseline=bool(cfg.get("raw_baseline", False)))
    if dm.manifest.get("cache"):  # training/evaluating from a feature cache: no backbone forward
        from .data.cache import attach_cache

        attach_cache(dm, module, cfg)
    return module, spec


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
        "control": bool(cfg.get("control", False)),
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
             "| layer | name | val acc (%) | test acc (%) |", "|---:|---|---:|---:|"]
    for r in res["layers"]:
        lines.append(f"| {r['layer']} | {r['name']} | {100 * r['val_acc']:.2f} | {100 * r['test_acc']:.2f} |")
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


def close_logger(logger, cfg: DictConfig) -> None:
    """Finalise a Lightning logger (and the W&B run behind it); a dashboard never fails a run."""
    if not logger:
        return
    try:
        logger.finalize("success")
    except Exception:  # noqa: BLE001
        pass
    lc = cfg.get("logger")
    if lc and lc.get("name") == "wandb":
        import wandb

        wandb.finish()


def prepare(cfg: DictConfig):
    """Seed, run dir, data module and probe module: the common start of every training driver."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    rdir = run_dir(cfg)
    dm = make_datamodule(cfg)
    module, spec = build_module(cfg, dm)
    return rdir, dm, module, spec


def teardown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank_zero(trainer: pl.Trainer) -> bool:
    return trainer.global_rank == 0


def train(cfg: DictConfig) -> dict | None:
    if cfg.get("mdl", False):  # MDL online code (Voita & Titov 2020) instead of plain training
        from .tasks.mdl import train_mdl

        return train_mdl(cfg)
    if cfg.task.get("kind") == "sentence" and str(cfg.prober.name).startswith("senteval"):
        from .tasks.senteval import train_senteval  # SentEval protocol on cached sentence features

        return train_senteval(cfg)
    t0 = time.time()
    rdir, dm, module, spec = prepare(cfg)
    ident = module.backbone.describe()
    print(f"[value-pl] backbone {ident.get('name')}: {ident.get('source')}")
    if dm.manifest.get("synthetic"):
        print("[value-pl] data: synthetic demo shards with planted signal (a smoke test, not a result)")
    logger = make_logger(cfg, rdir)
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt_cb = ModelCheckpoint(dirpath=str(rdir / "checkpoints"), monitor="val/acc/best", mode="max",
                              save_last=True, filename="best", auto_insert_metric_name=False)
    trainer = make_trainer(cfg, rdir, logger, [ckpt_cb])
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    trainer.test(module, datamodule=dm, verbose=False)
    res = None
    if is_rank_zero(trainer):
        res = results_dict(cfg, module, dm, {"seconds": round(time.time() - t0, 1),
                                             "checkpoints": {"last": str(rdir / "checkpoints" / "last.ckpt"),
                                                             "best": ckpt_cb.best_model_path or None}})
        write_results(rdir, res)
        log_results_table(logger, res)
    close_logger(logger, cfg)
    teardown_distributed()
    return res


def evaluate(cfg: DictConfig) -> dict | None:
    """Evaluate a saved prober checkpoint on val and test without training; writes results.json."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt or not Path(ckpt).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt!r} does not exist")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    rdir = run_dir(cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    hp = state.get("hyper_parameters", {})
    # the checkpoint's backbone/task/prober unless overridden on the command line
    if cfg.get("use_checkpoint_config", True) and hp.get("backbone_cfg"):
        cfg = OmegaConf.merge(cfg, {"backbone": hp["backbone_cfg"], "prober": hp["prober"],
                                    "task": {"name": hp["task"]["name"], "kind": hp["task"]["kind"],
                                             "labels": hp["task"]["labels"]},
                                    "seed": hp.get("seed", cfg.seed)})
        if hp.get("layers") is not None:
            cfg = OmegaConf.merge(cfg, {"layers": hp["layers"]})
    dm = make_datamodule(cfg)
    module, _ = build_module(cfg, dm)
    module.load_state_dict(state["state_dict"], strict=True)
    module.on_load_checkpoint(state)
    module.use_best_snapshots()
    logger = make_logger(cfg, rdir)
    trainer = make_trainer(cfg, rdir, logger)
    trainer.validate(module, datamodule=dm, verbose=False)
    # eval reports the checkpoint's own best validation accuracies where it has them
    trainer.test(module, datamodule=dm, verbose=False)
    res = None
    if is_rank_zero(trainer):
        res = results_dict(cfg, module, dm, {"evaluated_checkpoint": str(ckpt)})
        write_results(rdir, res)
    teardown_distributed()
    return res
