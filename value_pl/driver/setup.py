"""What every run starts with: run dir, data module, probe module, logger and trainer (importable and testable)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ..backbones import build_backbone
from ..backbones.checks import check_inputs
from ..data.collate import TaskSpec
from ..data.datamodule import ShardDataModule
from ..data.schema import pair_kind
from ..probers.module import ProbeModule

log = logging.getLogger("value_pl")

def _hydra():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except Exception:  # noqa: BLE001 - outside Hydra
        return None


def run_dir(cfg: DictConfig) -> Path:
    """``run_dir`` if set, else Hydra's output directory. In a multirun a fixed ``run_dir`` gets the job's number
    appended (``<run_dir>/<job num>``): every job would otherwise write the same results over the others."""
    d = cfg.get("run_dir")
    hc = _hydra()
    if not d:
        d = hc.runtime.output_dir if hc is not None else "runs/manual"
    elif hc is not None and "MULTIRUN" in str(hc.mode):
        d = str(Path(d) / str(hc.job.num))
        log.warning("run_dir=%s in a multirun: job %s writes to %s", cfg.get("run_dir"), hc.job.num, d)
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


def ensure_demo(root: str | Path, data_cfg) -> None:
    """Build the demo shards on first use (they are deterministic: same bytes as the committed ones)."""
    root = Path(root)
    if not (root / "manifest.json").exists() and data_cfg.get("name") == "demo":
        from ..datasets.demo import build_demo

        print(f"[value-pl] {root} missing: writing the synthetic demo shards (python -m value_pl.datasets.demo)")
        build_demo(root)


def make_datamodule(cfg: DictConfig) -> ShardDataModule:
    d = cfg.data
    decode = None
    root = d.root
    if d.get("cache"):  # a feature cache (python -m value_pl.extract) instead of the shards
        from ..data.cache import decode_record, open_cache

        root = d.cache
        open_cache(root)
        decode = decode_record
    else:
        ensure_demo(d.root, d)
    return ShardDataModule(root=root, batch_size=d.batch_size, num_workers=d.num_workers,
                           shuffle_buffer=d.get("shuffle_buffer", 256), seed=cfg.seed,
                           splits=OmegaConf.to_container(d.splits) if d.get("splits") else None,
                           train_batches=d.get("train_batches"), eval_batch_size=d.get("eval_batch_size"),
                           decode=decode, pin_memory=d.get("pin_memory"),
                           prefetch_factor=int(d.get("prefetch_factor") or 4),
                           reuse_buffers=bool(d.get("reuse_buffers", True)),
                           epoch_ahead=d.get("epoch_ahead"), read_ahead=d.get("read_ahead"),
                           register_buffers=bool(d.get("register_buffers", True)),
                           pin_threads=d.get("pin_threads"), pack_batches=bool(d.get("pack_batches", True)),
                           worker_start=d.get("worker_start"), map_shards=bool(d.get("map_shards", True)))


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


def check_splits(dm: ShardDataModule, spec: TaskSpec, stages=("train", "val", "test")) -> None:
    """A split that has no example of the task is a clear error at start (never NaN accuracies later)."""
    for stage in stages:
        split = dm.splits.get(stage, stage)
        entry = dm.split_entry(stage)
        n = sum(entry.get("pairs", {}).get(spec.name, {}).values())
        if n == 0:
            have = sorted(t for t, c in entry.get("pairs", {}).items() if sum(c.values()))
            raise ValueError(f"{dm.root}: split {split!r} ({entry.get('samples', 0)} samples) has no {spec.name} "
                             f"example (it has {', '.join(have) or 'no task'}): build shards with {spec.name} pairs "
                             f"in every split, or point data.splits.{stage} at a split that has them")


def warn_truncation(dm: ShardDataModule, backbone, stages=("train", "val", "test")) -> None:
    """Say at start when the shards hold texts longer than the backbone keeps (results.json counts them)."""
    limit = backbone.text_limit
    pre, post = backbone.input_encoder().special if backbone.tokenizer is not None else ([], [])
    for stage in stages:
        w = dm.split_entry(stage).get("max_words")
        if w and w + len(pre) + len(post) > limit:
            log.warning("%s: split %s has texts of up to %d words (at least %d tokens with [CLS]/[SEP]) but backbone %s "
                        "keeps %d tokens: longer texts are cut (counted in results.json 'truncated'; raise "
                        "backbone.max_text_len up to the model's %d positions)", dm.root, dm.splits.get(stage, stage),
                        w, w + len(pre) + len(post), backbone.describe().get("name"), limit, backbone.position_limit)


def make_relabel(cfg: DictConfig, spec: TaskSpec, dm: ShardDataModule):
    """Label transform at collate time: ``shuffle_labels=true`` (sanity baseline) or ``control=true``."""
    if cfg.get("shuffle_labels", False):
        from ..protocols.control import ShuffledLabels

        return ShuffledLabels(dm.label_counts(spec.name, "train"), seed=int(cfg.seed))
    if not cfg.get("control", False):
        return None
    from ..protocols.control import ControlRelabel

    return ControlRelabel.from_config(cfg, spec, dm)


def sweep_group(hydra_cfg=None) -> str | None:
    """The W&B group of a Hydra multirun: its sweep directory below ``multirun/``, "/" -> "-" (e.g.
    ``table3-2024-05-01_10-00-00`` for ``multirun/table3/2024-05-01_10-00-00``); None outside a multirun."""
    try:
        if hydra_cfg is None:
            from hydra.core.hydra_config import HydraConfig

            hydra_cfg = HydraConfig.get()
        if "MULTIRUN" not in str(hydra_cfg.mode):
            return None
        parts = Path(str(hydra_cfg.sweep.dir)).parts
    except Exception:  # noqa: BLE001 - outside Hydra
        return None
    if "multirun" in parts:
        parts = parts[len(parts) - parts[::-1].index("multirun"):]
    return "-".join(p for p in parts if p not in ("", ".", "/")) or None


def _job_name() -> str | None:
    """A multirun job's sub-directory name (``0-vcd-attention-uniter-base-s0``): its W&B run name."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return Path(hc.runtime.output_dir).name if "MULTIRUN" in str(hc.mode) else None
    except Exception:  # noqa: BLE001 - outside Hydra
        return None


def make_logger(cfg: DictConfig, rdir: Path):
    """``logger=wandb`` (offline unless ``logger.mode=online``; the runs of one multirun share a group, see
    :func:`sweep_group`), ``csv`` or ``none``."""
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

        return WandbLogger(project=lc.get("project", "value-pl"), name=lc.get("run_name") or _job_name(),
                           group=lc.get("group") or sweep_group(), save_dir=str(rdir),
                           offline=lc.get("mode", "offline") == "offline",
                           config=OmegaConf.to_container(cfg, resolve=True))
    raise ValueError(f"unknown logger {name!r} (wandb, csv, none)")


def cuda_defaults() -> None:
    """TF32 for the fp32 matmuls left outside bf16 autocast (what Lightning recommends on Ampere and later)."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


def make_trainer(cfg: DictConfig, rdir: Path, logger, callbacks=None) -> pl.Trainer:
    cuda_defaults()
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t.pop("name", None)
    if t.get("strategy") == "ddp" and t.get("accelerator") == "cpu":
        from pytorch_lightning.strategies import DDPStrategy

        t["strategy"] = DDPStrategy(process_group_backend="gloo")
    return pl.Trainer(default_root_dir=str(rdir), logger=logger, callbacks=callbacks or [],
                      enable_model_summary=False, **t)


def use_cuda_graphs(cfg: DictConfig, module, dm: ShardDataModule, trainer: pl.Trainer | None = None) -> bool:
    """Replay ``module``'s frozen forward from CUDA graphs (``cuda_graphs.*``; :mod:`value_pl.backbones.graphs`).
    ``cuda_graphs.enabled``: true -- always (``build_module``; on the CPU every call runs eagerly and is counted);
    false -- never; null (the default) -- when ``trainer`` runs the model on one CUDA device (not DDP: graphs on
    several GPUs are not measured yet) and the run has a backbone forward (not a feature cache); measured in
    docs/performance.md#gpu-benchmark-measured. True if attached."""
    if module.graphs is not None:  # already attached (enabled=true, by build_module)
        return True
    graphs = cfg.get("cuda_graphs") or {}
    enabled = graphs.get("enabled")
    if enabled is None:
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        enabled = getattr(device, "type", "cpu") == "cuda" and getattr(trainer, "world_size", 1) == 1 \
            and not dm.manifest.get("cache")
    if not enabled:
        return False
    module.use_cuda_graphs(True, max_graphs=int(graphs.get("max_graphs", 8)), verify=int(graphs.get("verify", 2)),
                           multiples=OmegaConf.to_container(graphs.get("multiples") or {}, resolve=True))
    return True


def prober_options_ignored(cfg, kind: str) -> list[str]:
    """``prober.*`` keys a run asks for that its heads do not read: a sentence task's ``layer_emb`` heads are one
    linear classifier (or SentEval MLP, ``prober.nhid``) per layer, so Eq. 4's ``rank`` and ``bias`` mean nothing
    there (the run says so rather than ignoring them silently)."""
    if kind != "sentence":
        return []
    p = cfg.get("prober") or {}
    return [f"prober.{k}={p.get(k)}" for k in ("rank", "bias") if p.get(k) not in (None, False)]


def baseline_rows_not_trained(cfg, plan) -> list[str]:
    """The baseline switches a run asks for (``raw_baseline``/``geometry_baseline``) that its prober trains no row
    for: an attention-only run (``prober=attention``) has no Eq. 4 heads, so both are no-ops there (sweeps such as
    ``experiment=fig4`` set them for every prober; the run says so rather than refusing)."""
    if plan is None:
        return []
    asked = [("raw_baseline=true", bool(cfg.get("raw_baseline", False)), plan.raw),
             ("geometry_baseline=true", bool(cfg.get("geometry_baseline", False)), plan.boxes)]
    return [name for name, on, has in asked if on and not has]


def build_module(cfg: DictConfig, dm: ShardDataModule, backbone=None):
    spec = task_spec(cfg, dm)
    if backbone is None:
        backbone = build_backbone(cfg.backbone, img_dim=dm.manifest.get("feature_dim"))
    check_inputs(backbone, dm.manifest, dm.root, regions=spec.kind != "sentence")  # before the first batch
    stages = [s for s in ("train", "val", "test") if dm.splits.get(s, s) in dm.manifest["splits"]]
    check_splits(dm, spec, stages)
    warn_truncation(dm, backbone, stages)
    relabel = make_relabel(cfg, spec, dm)
    dm.collate = backbone.collator(spec, relabel=relabel)
    layers = cfg.get("layers")
    layers = None if layers in (None, "all") else [l if isinstance(l, str) else f"layer_{int(l):02d}"
                                                   for l in OmegaConf.to_container(layers)]
    module = ProbeModule(backbone, task={"name": spec.name, "kind": spec.kind, "labels": spec.labels},
                         prober=OmegaConf.to_container(cfg.prober, resolve=True),
                         optim=OmegaConf.to_container(cfg.optim, resolve=True), layers=layers, seed=cfg.seed,
                         backbone_cfg=OmegaConf.to_container(cfg.backbone, resolve=True),
                         raw_baseline=bool(cfg.get("raw_baseline", False)),
                         geometry_baseline=bool(cfg.get("geometry_baseline", False)))
    ignored = prober_options_ignored(cfg, spec.kind)
    if ignored:
        log.warning("%s: not read by task=%s, a sentence task, whose heads are one classifier per layer over the "
                    "sentence's mean word state (prober.nhid, prober.dropout): Eq. 4's rank and bias are pair-task "
                    "options", ", ".join(ignored), spec.name)
    unmet = baseline_rows_not_trained(cfg, getattr(module, "plan", None))
    if unmet:
        log.warning("%s: no such row in this run: the baseline rows are Eq. 4 heads (prober=layer_emb or both), "
                    "and prober=%s trains none", ", ".join(unmet), cfg.prober.name)
    # how the labels were made (saved in prober checkpoints: python -m value_pl.eval relabels the same way)
    module.labelling = {"control": bool(cfg.get("control", False)), "control_seed": cfg.get("control_seed"),
                        "shuffle_labels": bool(cfg.get("shuffle_labels", False))}
    module.copy_streams.enabled = bool((cfg.get("data") or {}).get("copy_stream", True))
    if (cfg.get("cuda_graphs") or {}).get("enabled") is True:
        use_cuda_graphs(cfg, module, dm)
    if dm.manifest.get("cache"):  # training/evaluating from a feature cache: no backbone forward
        from ..data.cache import attach_cache

        attach_cache(dm, module, cfg)
    return module, spec


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
    cuda_defaults()
    rdir = run_dir(cfg)
    dm = make_datamodule(cfg)
    module, spec = build_module(cfg, dm)
    return rdir, dm, module, spec


def teardown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank_zero(trainer: pl.Trainer) -> bool:
    return trainer.global_rank == 0


