"""The composed config, checked at start by every entry point, before any file is read or weights loaded.

* Combinations that cannot mean anything are refused with a message naming the options and what to pick
  instead: a sentence task with a pair prober (``prober=attention``), a pair task with SentEval's sentence
  classifier, a pair task on a text-only backbone, ``raw_baseline``/``layers=[raw]`` off the region-region
  tasks, ``geometry_baseline``/``layers=[boxes]`` on a sentence task, ``control`` together with ``shuffle_labels``,
  a task kind that contradicts the task's name.
* Values with a meaningful range (learning rates, fractions, batch sizes, worker counts, k-means restarts,
  thresholds, layer lists ...) are checked with :mod:`value_pl.data.options`: out of range is an
  :class:`~value_pl.data.options.OptionError` naming the key, never a silent clamp or a crash deep in a model.

Hydra's struct mode already refuses a misspelt key (``prober.lrr=...``); these checks cover the values.
:func:`check_run` serves ``train``/``eval``/``extract``, :func:`check_analyze` ``analyze``, :func:`check_compare`
``compare`` (its suite's options: :func:`check_suite`, called by :func:`value_pl.compare.suite.suite_config`).
"""
from __future__ import annotations

from ..backbones import REGISTRY
from ..data.collate import BOX_DIMS
from ..data.loaders import START_METHODS
from ..data.options import OptionError, choice, flag, known_keys, number, numbers, value
from ..data.pincopy import MAX_THREADS as MAX_PIN_THREADS
from ..data.schema import PAIR_TASKS, pair_kind
from ..protocols.mdl import check_fractions

KINDS = ("phrase_region", "region_region", "sentence")
PAIR_PROBERS = ("layer_emb", "attention", "both")
SENTENCE_PROBERS = ("senteval_mlp", "senteval_lr")
#: backbone families without regions (their pair_layout refuses every pair task)
TEXT_ONLY = ("bert",)
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")
ROLES = ("train", "val", "test")

__all__ = ["OptionError", "check_analyze", "check_backbone", "check_compare", "check_data", "check_run",
           "check_suite"]


def _plain(cfg):
    """The config as plain containers, resolved once (fast to check); as it is where something cannot resolve yet
    (an interpolation to a value the user must still give: each key is then selected on its own)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001
        return cfg


def check_layers(cfg, key: str = "layers") -> None:
    """``all`` or a list of layer numbers (>= 0) / names (``layer_06``, ``all_heads``, ``raw``, ``boxes``)."""
    v = value(cfg, key, None)
    if v is None or v == "all":
        return
    ok = isinstance(v, list) and v and all(
        (isinstance(x, int) and not isinstance(x, bool) and x >= 0) or (isinstance(x, str) and x) for x in v)
    if not ok:
        raise OptionError(f"{key}={v!r}: must be all, or a non-empty list of layer numbers (0 = the embeddings) "
                          "and names, e.g. [0, 6] or [layer_06, all_heads]")


def check_data(cfg) -> None:
    """``data.*``: batch sizes, workers, shuffle buffer, batch cap, prefetch, splits, switches."""
    number(cfg, "data.batch_size", 1, integer=True)
    number(cfg, "data.eval_batch_size", 1, integer=True, null=True, why=" (null = data.batch_size)")
    number(cfg, "data.num_workers", 0, integer=True)
    number(cfg, "data.shuffle_buffer", 0, integer=True, why=" (0 or 1: no shuffle buffer)")
    number(cfg, "data.train_batches", 1, integer=True, null=True, why=" (null = one pass over the split)")
    number(cfg, "data.prefetch_factor", 1, integer=True)
    for k in ("data.pin_memory", "data.epoch_ahead", "data.read_ahead"):
        flag(cfg, k, null=True)
    flag(cfg, "data.reuse_buffers")
    flag(cfg, "data.register_buffers")
    flag(cfg, "data.copy_stream")
    flag(cfg, "data.pack_batches")
    flag(cfg, "data.map_shards")
    choice(cfg, "data.worker_start", START_METHODS, null=True, why=" (null = forkserver on a GPU, fork on the CPU)")
    number(cfg, "data.pin_threads", 1, MAX_PIN_THREADS, integer=True, null=True, why=" (null = a quarter of each GPU's cores, 1-4)")
    splits = value(cfg, "data.splits", None)
    if splits is not None:
        if not isinstance(splits, dict) or not all(isinstance(s, str) and s for s in splits.values()):
            raise OptionError(f"data.splits={splits!r}: must map roles (train/val/test) to split names of the shards")


def check_backbone(cfg) -> None:
    """``backbone.*``: a known family and the numbers' ranges (files are checked when they are loaded)."""
    choice(cfg, "backbone.family", sorted(REGISTRY))
    flag(cfg, "backbone.pretrained")
    number(cfg, "backbone.seed", 0, integer=True)
    number(cfg, "backbone.img_dim", 1, integer=True, null=True, why=" (null = the shards' feature dim)")
    choice(cfg, "backbone.box_mode", sorted(BOX_DIMS), null=True, why=" (null = the family's box encoding)")
    number(cfg, "backbone.max_text_len", 3, integer=True, null=True,
           why=" (room for [CLS], a word and [SEP]; null = the model's position limit)")
    number(cfg, "backbone.max_regions", 1, integer=True)


def check_logger(cfg) -> None:
    choice(cfg, "logger.name", LOGGERS)
    choice(cfg, "logger.mode", WANDB_MODES)


def _prober(cfg) -> None:
    number(cfg, "prober.rank", 1, integer=True, null=True, why=" (null = the hidden size)")
    flag(cfg, "prober.bias")
    number(cfg, "prober.nhid", 0, integer=True, why=" (0 = logistic regression)")
    number(cfg, "prober.dropout", 0, 1, hi_open=True)
    numbers(cfg, "prober.grid.nhid", 0, integer=True)
    numbers(cfg, "prober.grid.dropout", 0, 1, hi_open=True)
    numbers(cfg, "prober.grid.l2", 0)
    number(cfg, "prober.lr", 0, lo_open=True)
    number(cfg, "prober.batch_size", 1, integer=True)
    number(cfg, "prober.epoch_size", 1, integer=True)
    number(cfg, "prober.tenacity", 0, integer=True)
    number(cfg, "prober.max_epoch", 1, integer=True)
    number(cfg, "prober.seed", 0, integer=True)


def _combination(cfg) -> None:
    """Task x prober x backbone x switches: refuse what cannot run or would silently mean something else."""
    task, kind = value(cfg, "task.name"), value(cfg, "task.kind", None)
    prober, family = value(cfg, "prober.name"), value(cfg, "backbone.family", None)
    choice(cfg, "task.kind", KINDS, null=True, why=" (null = from the task's name)")
    kind = kind or pair_kind(str(task))
    if task in PAIR_TASKS and kind != pair_kind(task):
        raise OptionError(f"task.kind={kind} contradicts task={task}, a {pair_kind(task)} task: leave task.kind as "
                          f"configs/task/{task}.yaml sets it")
    choice(cfg, "prober.name", PAIR_PROBERS + SENTENCE_PROBERS)
    if kind == "sentence" and prober in ("attention", "both"):
        raise OptionError(f"prober={prober} reads the attention between the two items of a pair (VALUE Eq. 3), but "
                          f"task={task} is a sentence task: use prober=senteval_mlp or senteval_lr (SentEval's "
                          "protocol), or layer_emb (one linear head per layer)")
    if kind != "sentence" and prober in SENTENCE_PROBERS:
        raise OptionError(f"prober={prober} is SentEval's sentence classifier, but task={task} is a {kind} pair task: "
                          "use prober=layer_emb (Eq. 4) or attention (Eq. 3)")
    if kind != "sentence" and family in TEXT_ONLY:
        raise OptionError(f"backbone {value(cfg, 'backbone.name', family)} (backbone.family={family}) is text-only "
                          f"(no regions), but task={task} is a {kind} task: use it for sentence tasks, or pick a "
                          "vision-and-language backbone (uniter, lxmert, visualbert)")
    layers = value(cfg, "layers", None)
    raw = bool(value(cfg, "raw_baseline", False)) or (isinstance(layers, list) and "raw" in layers)
    if raw and kind != "region_region":
        which = "raw_baseline=true" if value(cfg, "raw_baseline", False) else f"layers={layers}"
        raise OptionError(f"{which}: the raw pseudo-layer (Eq. 4 on the detector's region features) exists for the "
                          f"region-region tasks (vri, vrc) only; task={task} is a {kind} task")
    boxes = bool(value(cfg, "geometry_baseline", False)) or (isinstance(layers, list) and "boxes" in layers)
    if boxes and kind == "sentence":
        which = "geometry_baseline=true" if value(cfg, "geometry_baseline", False) else f"layers={layers}"
        raise OptionError(f"{which}: the boxes control row (Eq. 4 on the regions' box geometry) exists for the pair "
                          f"tasks (vcd, vcc, vri, vrc) only; task={task} is a sentence task")
    if value(cfg, "control", False) and value(cfg, "shuffle_labels", False):
        raise OptionError("control=true and shuffle_labels=true: pick one (control task or shuffled labels)")


def _no_cache(cfg, entry: str) -> None:
    c = value(cfg, "data.cache", None)
    if c:
        raise OptionError(f"data.cache={c}: a feature cache holds prober inputs for train/eval; {entry} runs the "
                          "backbone on the shards (data.root): leave data.cache null")


def check_run(cfg, entry: str = "train") -> None:
    """The config of ``train``/``eval``/``extract``: combinations first, then the values' ranges."""
    cfg = _plain(cfg)
    _combination(cfg)
    check_layers(cfg)
    for k in ("control", "shuffle_labels", "raw_baseline", "geometry_baseline", "mdl", "progress"):
        flag(cfg, k)
    flag(cfg, "gc_freeze")
    number(cfg, "control_seed", 0, integer=True, null=True, why=" (null = seed)")
    number(cfg, "optim.lr", 0, lo_open=True)
    number(cfg, "optim.weight_decay", 0)
    _prober(cfg)
    check_data(cfg)
    check_backbone(cfg)
    check_logger(cfg)
    fractions = value(cfg, "mdl_opts.fractions", None)
    if fractions is not None:  # null: the paper's blocks
        try:
            check_fractions(fractions if isinstance(fractions, list) else [fractions])
        except (TypeError, ValueError) as e:
            raise OptionError(str(e) if "mdl_opts.fractions" in str(e) else
                              f"mdl_opts.fractions={fractions!r}: {e}") from None
    number(cfg, "mdl_opts.max_epochs", 1, integer=True)
    number(cfg, "mdl_opts.patience", 0, integer=True)
    number(cfg, "mdl_opts.batch_size", 1, integer=True)
    number(cfg, "mdl_opts.lr", 0, lo_open=True)
    number(cfg, "mdl_opts.max_train", 1, integer=True, null=True, why=" (null = every training example)")
    flag(cfg, "cuda_graphs.enabled", null=True)
    number(cfg, "cuda_graphs.max_graphs", 1, integer=True)
    number(cfg, "cuda_graphs.verify", 0, integer=True)
    for k in ("text", "regions", "rows"):
        number(cfg, f"cuda_graphs.multiples.{k}", 1, integer=True)
    senteval = value(cfg, "task.kind", None) == "sentence" and str(value(cfg, "prober.name")).startswith("senteval")
    outside = "mdl=true" if value(cfg, "mdl", False) else f"prober={value(cfg, 'prober.name')}" if senteval else None
    if entry == "train" and outside and value(cfg, "ckpt_path", None):
        raise OptionError(f"ckpt_path=... resumes Lightning training, but {outside} trains its probes outside Lightning "
                          "(no checkpoints, nothing to resume): leave ckpt_path null")
    if entry == "eval":
        flag(cfg, "use_checkpoint_config")
        if value(cfg, "mdl", False):
            raise OptionError("mdl=true: eval evaluates a Lightning prober checkpoint; MDL runs (train mdl=true) write "
                              "their codelengths to results.json and no checkpoint")
    if entry == "extract":
        choice(cfg, "cache.dtype", ("float16", "float32"))
        sp = value(cfg, "cache.splits", None)
        if sp is not None and (not isinstance(sp, list) or not sp or any(s not in ROLES for s in sp)):
            raise OptionError(f"cache.splits={sp!r}: must be a non-empty list of the roles {', '.join(ROLES)}")


def check_analyze(cfg) -> None:
    """The config of ``analyze``."""
    from ..analysis import ANALYSES
    from ..analysis.maxattn import AVERAGES

    cfg = _plain(cfg)
    run = value(cfg, "analysis.run", None)
    if not isinstance(run, list) or not run:
        raise OptionError(f"analysis.run={run!r}: must be a non-empty list of analyses ({', '.join(ANALYSES)})")
    unknown = [a for a in run if a not in ANALYSES]
    if unknown:
        raise OptionError(f"analysis.run: unknown analysis {unknown} (known: {', '.join(ANALYSES)}, or analysis=all)")
    number(cfg, "seed", 0, integer=True)
    number(cfg, "max_samples", 1, integer=True, null=True, why=" (null = the whole split)")
    number(cfg, "batch_size", 1, integer=True)
    number(cfg, "num_workers", 0, integer=True, null=True, why=" (null = data.num_workers)")
    flag(cfg, "progress")
    number(cfg, "tsne_sample", 0, integer=True)
    numbers(cfg, "tsne_layers", 0, integer=True, null=True, why=" (null = the first and last fused layer)")
    number(cfg, "rand_iou", 0, 1, lo_open=True, null=True, why=" (null = any other region)")
    number(cfg, "kmeans.n_init", 1, integer=True)
    number(cfg, "kmeans.max_iter", 1, integer=True)
    flag(cfg, "fusion.include_special")
    number(cfg, "i2t.threshold", 0, 1)
    flag(cfg, "i2t.include_special")
    choice(cfg, "maxattn.average", AVERAGES)
    _no_cache(cfg, "analyze")
    check_data(cfg)
    check_backbone(cfg)
    check_logger(cfg)


def check_compare(cfg) -> None:
    """The config of ``compare`` (the suite itself: :func:`value_pl.compare.suite.suite_config`)."""
    cfg = _plain(cfg)
    choice(cfg, "checkpoint_key", ("auto", "checkpoint", "path"))
    numbers(cfg, "steps", 0, integer=True, null=True, why=" (null = parsed from the checkpoint names)")
    for k in ("progress", "plots"):
        flag(cfg, k)
    _no_cache(cfg, "compare")
    family, tasks = value(cfg, "backbone.family", None), value(cfg, "suite.tasks", None) or []
    pairs = [t for t in tasks if isinstance(t, str) and pair_kind(t) != "sentence"]
    if family in TEXT_ONLY and pairs:
        raise OptionError(f"suite.tasks={tasks}: {pairs} are pair tasks, but backbone.family={family} is text-only "
                          "(no regions): give it sentence tasks (e.g. suite.tasks=[bshift]) or suite.tasks=[]")
    check_data(cfg)
    check_backbone(cfg)
    check_logger(cfg)


def check_suite(cfg: dict, known: dict) -> None:
    """The compare suite's options (``known``: its defaults, :data:`value_pl.compare.suite.QUICK`): known keys, and
    every value in its range."""
    known_keys(cfg, known, "suite")
    for k in ("batch_size", "epochs", "pair_batch_size"):
        number(cfg, k, 1, integer=True, why=f" (suite.{k})")
    for k in ("analysis_samples", "train_samples", "val_samples", "test_samples"):
        number(cfg, k, 0, integer=True, why=f" (suite.{k})")
    number(cfg, "kmeans.n_init", 1, integer=True, why=" (suite.kmeans)")
    number(cfg, "kmeans.max_iter", 1, integer=True, why=" (suite.kmeans)")
    number(cfg, "rank", 1, integer=True, null=True, why=" (suite.rank; null = the hidden size)")
    number(cfg, "lr", 0, lo_open=True, why=" (suite.lr)")
    number(cfg, "weight_decay", 0, why=" (suite.weight_decay)")
    number(cfg, "seed", 0, integer=True, why=" (suite.seed)")
    number(cfg, "cpu_threads", 1, integer=True, null=True, why=" (suite.cpu_threads; null = torch's setting)")
    choice(cfg, "prober", ("layer_emb", "attention", "both"), why=" (suite.prober)")
    a = cfg.get("analyses")
    if a is not None and (not isinstance(a, list) or any(x not in ("fusion", "modality") for x in a)):
        raise OptionError(f"analyses={a!r} (suite.analyses): must be a list of fusion, modality")
    t = cfg.get("tasks")
    if t is not None and (not isinstance(t, list) or not all(isinstance(x, str) and x for x in t)):
        raise OptionError(f"tasks={t!r} (suite.tasks): must be a list of task names (e.g. [vcc, vrc])")
    if cfg.get("analyses") and not cfg.get("analysis_samples"):
        raise OptionError(f"analysis_samples=0 (suite.analysis_samples) with analyses={cfg['analyses']}: the "
                          "analyses would see no sample (set analyses=[] to run none)")
    layers = cfg.get("layers")
    if layers not in (None, "all") and not (isinstance(layers, list) and layers):
        raise OptionError(f"layers={layers!r} (suite.layers): must be all or a non-empty list, e.g. [0, 6]")
