"""Train probers (``python -m value_pl.train``) and evaluate a saved prober (``python -m value_pl.eval``)."""
from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from ..data.safe_load import check_loadable, honours_switch, load_torch, unsafe_allowed
from .mdl import train_mdl
from .senteval import train_senteval
from .results import log_results_table, results_dict, training_record, write_results
from .heap import frozen_heap
from .throughput import ThroughputMonitor
from .validate import check_run
from .setup import (build_module, close_logger, is_rank_zero, make_datamodule, make_logger, make_trainer, prepare,
                    run_dir, teardown_distributed, use_cuda_graphs)


@honours_switch
def train(cfg: DictConfig) -> dict | None:
    check_run(cfg, "train")  # combinations and value ranges, before any file is read
    if cfg.get("mdl", False):  # MDL online code (Voita & Titov 2020) instead of plain training
        return train_mdl(cfg)
    if cfg.task.get("kind") == "sentence" and str(cfg.prober.name).startswith("senteval"):
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
                              filename="best", auto_insert_metric_name=False)
    # last.ckpt after every epoch: Lightning's save_last rewrites it only when the monitored value improved, so an
    # epoch that did not improve left an older epoch's heads and best snapshots there (eval and resume read it)
    last_cb = ModelCheckpoint(dirpath=str(rdir / "checkpoints"), monitor=None, save_top_k=1, filename="last",
                              auto_insert_metric_name=False, enable_version_counter=False)
    speed = ThroughputMonitor()
    trainer = make_trainer(cfg, rdir, logger, [ckpt_cb, last_cb, speed])
    use_cuda_graphs(cfg, module, dm, trainer)  # cuda_graphs.enabled=null: on when the model runs on a CUDA device
    resume = cfg.get("ckpt_path")
    if resume:  # refused here, naming the file and the switch, if it needs pickle (Lightning would say less)
        check_loadable(resume, "prober checkpoint (ckpt_path)")
    with frozen_heap(bool(cfg.get("gc_freeze", True))):  # full collections skip the run's long-lived objects
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=not unsafe_allowed())
        trainer.test(module, datamodule=dm, verbose=False)
    res = None
    throughput = speed.summary()
    if module.graphs is not None:  # this rank's graphs: how many, how many calls they served, what ran eagerly
        throughput["cuda_graphs"] = module.graphs.stats()
        if is_rank_zero(trainer):
            print(f"[value-pl] cuda graphs: {throughput['cuda_graphs']}")
    buffers = dm.buffer_stats()
    if buffers is not None:  # pinned training batches through reused buffers (data.register_buffers: page-locked)
        throughput["ring_buffers"] = buffers
        if is_rank_zero(trainer):
            print(f"[value-pl] loader buffers: {buffers}")
    starts = dm.worker_starts()
    if starts:  # seconds each start of a loader's worker processes took (persistent workers: once per run)
        throughput["worker_start_s"] = starts
        throughput["worker_start_method"] = dm.start_methods()  # fork / forkserver (data.worker_start)
    if is_rank_zero(trainer):
        res = results_dict(cfg, module, dm, {"seconds": round(time.time() - t0, 1), "throughput": throughput,
                                             "training": training_record(cfg, trainer.world_size),
                                             "checkpoints": {"last": str(rdir / "checkpoints" / "last.ckpt"),
                                                             "best": ckpt_cb.best_model_path or None}})
        write_results(rdir, res)
        log_results_table(logger, res, rdir)
    close_logger(logger, cfg)
    teardown_distributed()
    return res


@honours_switch
def evaluate(cfg: DictConfig) -> dict | None:
    """Evaluate a saved prober checkpoint on val and test without training; writes results.json."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt or not Path(ckpt).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt!r} does not exist")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    rdir = run_dir(cfg)
    state = load_torch(ckpt, what="prober checkpoint (ckpt_path)")
    hp = state.get("hyper_parameters", {})
    # the checkpoint's backbone/task/prober/layers win over the command line's (use_checkpoint_config=false: not)
    if cfg.get("use_checkpoint_config", True) and hp.get("backbone_cfg"):
        cfg = cfg.copy()
        with open_dict(cfg):  # backbone and prober as saved, whole (not merged into this command line's groups)
            cfg.backbone, cfg.prober = hp["backbone_cfg"], hp["prober"]
        cfg = OmegaConf.merge(cfg, {"task": {"name": hp["task"]["name"], "kind": hp["task"]["kind"],
                                             "labels": hp["task"]["labels"]},
                                    "seed": hp.get("seed", cfg.seed)})
        if hp.get("layers") is not None:
            cfg = OmegaConf.merge(cfg, {"layers": hp["layers"]})
        # the heads it has (raw region features, box geometry) and the labels they were trained on (control task,
        # shuffled)
        cfg = OmegaConf.merge(cfg, {"raw_baseline": bool(hp.get("raw_baseline", False)),
                                    "geometry_baseline": bool(hp.get("geometry_baseline", False))})
        labelling = (state.get("value_pl") or {}).get("labelling")
        if labelling:
            cfg = OmegaConf.merge(cfg, labelling)
    check_run(cfg, "eval")  # the checkpoint's task/prober/backbone with this command line's data and switches
    dm = make_datamodule(cfg)
    module, _ = build_module(cfg, dm)
    module.load_state_dict(state["state_dict"], strict=True)
    module.on_load_checkpoint(state)
    module.use_best_snapshots()
    logger = make_logger(cfg, rdir)
    trainer = make_trainer(cfg, rdir, logger)
    use_cuda_graphs(cfg, module, dm, trainer)
    with frozen_heap(bool(cfg.get("gc_freeze", True))):
        trainer.validate(module, datamodule=dm, verbose=False)
        # eval reports the checkpoint's own best validation accuracies where it has them
        trainer.test(module, datamodule=dm, verbose=False)
    res = None
    if is_rank_zero(trainer):
        res = results_dict(cfg, module, dm, {"evaluated_checkpoint": str(ckpt)})
        write_results(rdir, res)
        log_results_table(logger, res, rdir)
    close_logger(logger, cfg)
    teardown_distributed()
    return res
