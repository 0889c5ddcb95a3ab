"""A small, fixed-budget probe suite for one set of backbone weights (``compare`` and ``ProbeCallback``).

One suite run = a few frozen forward passes over a few shard samples, feeding

* the training-free analyses of :mod:`value_pl.analysis` -- multimodal fusion (k-means NMI per layer,
  :class:`~value_pl.analysis.fusion.Fusion`) and the modality importance of [CLS]
  (:class:`~value_pl.analysis.modality.ModalityImportance`, single-stream backbones only), and
* layer-embedding probers (VALUE Eq. 4, the :class:`~value_pl.probers.module.ProbeModule` heads) for
  VCC / VRC: features are extracted once per batch with the module's own plan, then the heads are
  trained in-process on the cached tensors for ``epochs`` epochs (Adam, seeded shuffles), selected per
  head on the validation samples and scored on the test samples.

Every number is deterministic for a given (weights, suite config, data): heads start from their seeded
init, the shuffles and k-means restarts use private generators, the global RNG is never drawn from.

Metric names (flat, ``/``-separated, as W&B keys):

``fusion/nmi/layer_XX``, ``fusion/nmi/mean`` (mean over the transformer layers, the embeddings excluded)
``modality/text``, ``modality/image`` (mean [CLS] attention mass per head, Eq. 1)
``<task>/acc/layer_XX`` (test accuracy of that layer's head at its best validation epoch),
``<task>/acc/best`` (test accuracy of the head best by validation), ``<task>/val/best``.

A task with no examples among the train or validation samples is not measured (``skipped``): its heads would
keep their initial weights and report an untrained head's accuracy.

The suite leaves the backbone as it found it: training flags and ``requires_grad`` of every module
are restored (:func:`~value_pl.compare.state.preserved`), and the backbone is never moved between devices.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..backbones.capture import CaptureSpec
from .state import cpu_threads, preserved

log = logging.getLogger("value_pl")

#: ``suite=quick`` (configs/suite/quick.yaml) as code: the callback's default
QUICK = {
    "name": "quick",
    "batch_size": 32,  # samples per frozen forward
    "analyses": ["fusion", "modality"],
    "analysis_split": "test",  # a role (train/val/test) or a split name of the shards
    "analysis_samples": 64,
    "kmeans": {"n_init": 4, "max_iter": 50},
    "tasks": ["vcc", "vrc"],
    "prober": "layer_emb",
    "rank": 64,  # W_w, W_mu: d -> rank (Eq. 4 with a low-rank product; null = d)
    "layers": "all",
    "train_samples": 192,
    "val_samples": 64,
    "test_samples": 96,
    "epochs": 6,
    "pair_batch_size": 128,  # pairs per head update
    "lr": 0.003,
    "weight_decay": 0.0,
    "seed": 0,
    "cpu_threads": 1,  # intra-op CPU threads while the suite runs, restored after (null = torch's setting)
}


def suite_config(cfg=None, **overrides) -> dict:
    """A plain dict: ``QUICK`` updated by ``cfg`` (dict or DictConfig) and keyword overrides. A key that is not
    one of ``QUICK``'s (a misspelt option) or a value out of its range is an
    :class:`~value_pl.data.options.OptionError` naming it (:func:`value_pl.driver.validate.check_suite`)."""
    from ..driver.validate import check_suite

    out = json.loads(json.dumps(QUICK))
    if cfg is not None:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        out.update(dict(cfg))
    out.update(overrides)
    check_suite(out, QUICK)
    return out


#: bump when the suite's code changes its numbers: cached rows of older versions are then recomputed
SUITE_VERSION = 1


def suite_hash(cfg: dict, extra: dict | None = None) -> str:
    """sha256 of the suite config (plus anything else the numbers depend on, e.g. the data identity)."""
    blob = json.dumps({"suite": cfg, "extra": extra or {}, "version": SUITE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- state
def _device(backbone: nn.Module) -> torch.device:
    p = next(backbone.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


# -------------------------------------------------------------------------------------------- data
@dataclass
class SuiteData:
    """Decoded shard samples the suite reads (loaded once, kept in memory: a few hundred samples)."""

    root: Path
    manifest: dict
    splits: dict[str, list[dict]] = field(default_factory=dict)

    @classmethod
    def load(cls, root, cfg: dict, splits: dict | None = None) -> "SuiteData":
        """Read the first N samples of the splits ``cfg`` needs from shards at ``root``.

        splits: ``{role: split name}`` for the roles train/val/test (default: the same names).
        """
        import webdataset as wds

        from ..data.schema import decode_sample, load_manifest

        root = Path(root)
        manifest = load_manifest(root)
        names = {"train": "train", "val": "val", "test": "test"}
        names.update(splits or {})
        want: dict[str, int] = {}
        if cfg.get("tasks"):
            for role, key in (("train", "train_samples"), ("val", "val_samples"), ("test", "test_samples")):
                want[names[role]] = max(want.get(names[role], 0), int(cfg[key]))
        if cfg.get("analyses"):
            split = names.get(cfg["analysis_split"], cfg["analysis_split"])
            want[split] = max(want.get(split, 0), int(cfg["analysis_samples"]))
        data = cls(root, manifest)
        for split, n in want.items():
            if split not in manifest["splits"]:
                raise KeyError(f"{root}/manifest.json has no split {split!r} (has {list(manifest['splits'])})")
            urls = [str(root / s) for s in manifest["splits"][split]["shards"]]
            decode = functools.partial(decode_sample, feature_dim=manifest.get("feature_dim"))
            pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.map(decode))
            out = []
            for s in pipe:
                out.append(s)
                if len(out) >= n:
                    break
            data.splits[split] = out
        data.roles = names
        return data

    def take(self, role: str, n: int) -> list[dict]:
        split = self.roles.get(role, role)
        return self.splits[split][: int(n)]

    def identity(self) -> dict:
        return {"root": str(self.root), "dataset": self.manifest.get("dataset"),
                "version": self.manifest.get("version"), "seed": self.manifest.get("seed"),
                "samples": {k: len(v) for k, v in self.splits.items()}}


# ------------------------------------------------------------------------------------------ suite
def _layer_key(n: int) -> str:
    return f"layer_{int(n):02d}"


def _analyses(backbone, cfg: dict):
    from ..analysis.common import Unsupported
    from ..analysis.fusion import Fusion
    from ..analysis.modality import ModalityImportance

    table = {"fusion": Fusion, "modality": ModalityImportance}
    acfg = {"seed": int(cfg.get("seed", 0)), "kmeans": dict(cfg.get("kmeans") or {})}
    out, skipped = [], {}
    for name in cfg.get("analyses") or []:
        if name not in table:
            raise KeyError(f"suite: unknown analysis {name!r} (known: {', '.join(table)})")
        try:
            out.append(table[name](backbone, acfg))
        except Unsupported as e:
            skipped[name] = str(e)
    return out, skipped


def _analysis_metrics(a, res: dict) -> dict[str, float]:
    m: dict[str, float] = {}
    if a.name == "fusion":
        vals = []
        for r in res["layers"]:
            m[f"fusion/nmi/{_layer_key(r['layer'])}"] = float(r["nmi"])
            if r["layer"] > 0 and r["nmi"] == r["nmi"]:
                vals.append(float(r["nmi"]))
        if not vals:
            vals = [float(r["nmi"]) for r in res["layers"] if r["nmi"] == r["nmi"]]
        m["fusion/nmi/mean"] = sum(vals) / len(vals) if vals else math.nan
    elif a.name == "modality":
        m["modality/text"] = float(res["overall"]["text_mean"]) if res["samples"] else math.nan
        m["modality/image"] = float(res["overall"]["image_mean"]) if res["samples"] else math.nan
    return m


def _task_labels(data: SuiteData, task: str) -> list[str]:
    labels = data.manifest.get("labels", {}).get(task)
    if labels is None:
        raise KeyError(f"{data.root}/manifest.json has no labels for task {task!r}")
    return list(labels)


def _layer_names(backbone, kind: str) -> list[str]:
    """The names ``layers=`` may use for ``kind`` tasks on ``backbone`` (none where it has no such tasks)."""
    from ..probers.features import PSEUDO_LAYERS
    from ..probers.module import layer_number

    try:
        if kind == "sentence":
            return [f"layer_{layer_number(n):02d}" for n in backbone.sentence_layers()]
        return [l.name for l in backbone.pair_layout(kind).layers] + list(PSEUDO_LAYERS)
    except (ValueError, NotImplementedError):
        return []


def _probe_module(backbone, task: str, cfg: dict, data: SuiteData):
    from ..data.schema import pair_kind
    from ..probers.module import ProbeModule

    layers = cfg.get("layers")
    if layers in (None, "all"):
        layers = None
    else:
        layers = [l if isinstance(l, str) else _layer_key(l) for l in layers]
    kind = pair_kind(task)
    if kind not in ("phrase_region", "region_region", "sentence"):
        raise ValueError(f"the suite cannot probe {task!r} (a {kind} task)")
    if layers is not None:  # one list for every task: each probes the listed layers its layout has
        everywhere = {k: _layer_names(backbone, k) for k in ("phrase_region", "region_region", "sentence")}
        unknown = [n for n in layers if not any(n in v for v in everywhere.values())]
        if unknown:
            raise ValueError(f"suite layers={layers}: {unknown} are no layers of this backbone; available: "
                             f"{sorted(set().union(*everywhere.values()))}")
        layers = [n for n in layers if n in everywhere[kind]]
        if not layers:
            raise ValueError(f"none of the suite's layers={cfg.get('layers')} is a layer of {task} ({kind}) on this "
                             f"backbone; it has {everywhere[kind]}")
    # pair tasks: Eq. 4 heads (rank ``rank``); sentence tasks (text-only BERT checkpoints): logistic regression
    prober = {"name": cfg.get("prober", "layer_emb"), "rank": cfg.get("rank"), "bias": False, "nhid": 0}
    return ProbeModule(backbone, task={"name": task, "kind": kind, "labels": _task_labels(data, task)},
                       prober=prober,
                       optim={"lr": float(cfg["lr"]), "weight_decay": float(cfg.get("weight_decay", 0.0))},
                       layers=layers, seed=int(cfg.get("seed", 0)))


class _Probe:
    """One task's ProbeModule (plan + seeded heads), its collator and the cached features per role."""

    def __init__(self, backbone, task: str, cfg: dict, data: SuiteData, device):
        from ..data.collate import TaskSpec

        self.task = task
        self.module = _probe_module(backbone, task, cfg, data)
        self.module.to(device)  # the heads go to the backbone's device, never the other way round
        self.collate = backbone.collator(TaskSpec(name=task, kind=self.module.kind, labels=self.module.labels))
        self.feats: dict[str, dict[str, list]] = {}
        self.labels: dict[str, list] = {}

    def capture(self, batch: dict) -> CaptureSpec:
        if self.module.kind == "sentence":
            return CaptureSpec(hidden=list(self.module.sentence_names), attn=[])
        return self.module.plan.capture(batch)

    def add(self, role: str, out, batch: dict) -> None:
        if batch["labels"].numel() == 0:
            return
        if self.module.kind == "sentence":
            from ..probers.features import sentence_inputs

            f = {"sent": (sentence_inputs(out, self.module.sentence_names),)}
        else:
            # (rows captured for every probe and analysis at once: found by position, not by the collator's slots)
            f = self.module.plan.inputs(out, batch, merged=True)
        store = self.feats.setdefault(role, {})
        for g, v in f.items():
            store.setdefault(g, []).append(tuple(t.detach() for t in v))
        self.labels.setdefault(role, []).append(batch["labels"])

    def cat(self, role: str, device) -> tuple[dict, torch.Tensor]:
        """Stacked group inputs ``(n, N, ...)`` over the role's batches, and the labels ``(N,)``."""
        store = self.feats.get(role, {})
        feats = {g: tuple(torch.cat([v[j] for v in vs], dim=1) for j in range(len(vs[0]))) for g, vs in store.items()}
        ys = self.labels.get(role, [])
        return feats, (torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long, device=device))


def _accuracy(module, feats: dict, y: torch.Tensor, bs: int = 4096) -> dict[str, float]:
    """Test accuracy of every head: ``{head key: accuracy}`` (NaN without examples)."""
    keys = [k for g in module.groups if g.name in feats for k in g.keys]
    if y.numel() == 0:
        return {k: math.nan for k in keys}
    correct = None
    with torch.no_grad():
        for i in range(0, y.numel(), bs):
            part = {g: tuple(t[:, i : i + bs] for t in v) for g, v in feats.items()}
            preds = torch.cat([lg.argmax(-1) for lg in module.group_logits(part).values()])
            c = (preds == y[i : i + bs][None]).sum(1)
            correct = c if correct is None else correct + c
    return {k: float(c) / y.numel() for k, c in zip(keys, correct.tolist())}


def _train_heads(p: _Probe, cfg: dict, device) -> dict[str, float]:
    """Train the task's heads on the cached train features, select per head on val, score on test."""
    module, task = p.module, p.task
    tr, ytr = p.cat("train", device)
    va, yva = p.cat("val", device)
    te, yte = p.cat("test", device)
    keys = [k for g in module.groups if g.name in tr for k in g.keys]
    best_val = {k: -1.0 for k in keys}

    def snap(k):
        g, i = module.slot[k]
        return module.heads[g].slot_state(i)

    best_state = {k: snap(k) for k in keys}
    opt = module.configure_optimizers()
    g = torch.Generator(device="cpu").manual_seed(int(cfg.get("seed", 0)) * 7919 + 17)
    pbs = int(cfg.get("pair_batch_size", 128))
    n = ytr.numel()
    with torch.enable_grad():
        for _epoch in range(int(cfg["epochs"])):
            if n and keys:
                perm = torch.randperm(n, generator=g).to(device)
                for i in range(0, n, pbs):
                    idx = perm[i : i + pbs]
                    loss = module.loss({gn: tuple(t[:, idx] for t in v) for gn, v in tr.items()}, ytr[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            for k, a in _accuracy(module, {gn: v for gn, v in va.items()}, yva).items():
                if a == a and a > best_val[k]:
                    best_val[k] = a
                    best_state[k] = snap(k)
    for k in keys:
        gn, i = module.slot[k]
        module.heads[gn].load_slot_state(i, best_state[k])
    test = _accuracy(module, te, yte)
    m: dict[str, float] = {}
    for k in keys:
        m[f"{task}/acc/{module.display_name(k)}"] = float(test.get(k, math.nan))
    if keys:
        top = max(keys, key=lambda k: (best_val[k], -keys.index(k)))  # first among equals
        m[f"{task}/acc/best"] = float(test.get(top, math.nan))
        m[f"{task}/val/best"] = float(best_val[top])
    return m


def _chunks(n: int, bs: int, cuts=()):
    """[start, end) batches over n samples, of at most bs, with boundaries at every position in ``cuts``."""
    out, i = [], 0
    stops = sorted(c for c in set(cuts) if 0 < c < n)
    while i < n:
        j = min([i + bs, n] + [c for c in stops if c > i])
        out.append((i, j))
        i = j
    return out


def run_suite(backbone, cfg: dict, data: SuiteData) -> dict:
    """Run the suite on ``backbone`` (a :class:`~value_pl.backbones.base.Backbone`).

    One frozen forward per batch serves the analyses and every task's probe. Returns
    ``{"metrics": {name: value}, "skipped": {part: why}, "seconds": s, "forwards": n}``. The
    backbone's training flags and ``requires_grad`` are restored afterwards; it stays on its device.
    """
    from ..analysis.common import merge_captures

    t0 = time.time()
    cfg = suite_config(cfg)
    device = _device(backbone)
    metrics: dict[str, float] = {}
    forwards = 0
    with preserved(backbone), cpu_threads(cfg.get("cpu_threads"), device):
        backbone.eval()
        analyses, skipped = _analyses(backbone, cfg)
        probes: list[_Probe] = []
        for task in cfg.get("tasks") or []:
            try:
                probes.append(_Probe(backbone, task, cfg, data, device))
            except (NotImplementedError, ValueError) as e:  # e.g. a text-only backbone has no pair layout
                skipped[task] = str(e)
        a_role = cfg["analysis_split"]
        roles = {}  # role -> (samples to read, of which the first n_a feed the analyses)
        if probes:
            for role in ("train", "val", "test"):
                roles[role] = int(cfg[f"{role}_samples"])
        if analyses:
            roles[a_role] = max(roles.get(a_role, 0), int(cfg["analysis_samples"]))
        base = backbone.collator()
        bs = int(cfg["batch_size"])
        with torch.no_grad():
            for role, n in roles.items():
                samples = data.take(role, n)
                n_a = int(cfg["analysis_samples"]) if (analyses and role == a_role) else 0
                n_p = int(cfg.get(f"{role}_samples", 0)) if probes and role in ("train", "val", "test") else 0
                for i, j in _chunks(len(samples), bs, (n_a, n_p)):
                    chunk = samples[i:j]
                    use_a = i < n_a
                    use_p = [p for p in probes if i < n_p]
                    tb = [(p, _to(p.collate(chunk), device)) for p in use_p]
                    batch = tb[0][1] if tb else _to(base(chunk), device)
                    batch["_offset"] = i
                    specs = [a.capture(batch) for a in analyses] if use_a else []
                    specs += [p.capture(b) for p, b in tb]
                    specs = [s for s in specs if s is not None]
                    if not specs:
                        continue
                    out = backbone(batch, merge_captures(specs))
                    forwards += 1
                    if use_a:
                        for a in analyses:
                            a.update(out, batch)
                    for p, b in tb:
                        p.add(role, out, b)
        for a in analyses:
            metrics.update(_analysis_metrics(a, a.result()))
        for p in probes:
            # heads trained on nothing, or selected on nothing (they would keep their initial weights), would report
            # an untrained head's test accuracy: the task is not measured, and said so
            empty = [r for r in ("train", "val") if not sum(int(y.numel()) for y in p.labels.get(r, []))]
            if empty:
                n = " / ".join(str(cfg[f"{r}_samples"]) for r in empty)
                skipped[p.task] = (f"no {p.task} examples among the first {n} {' / '.join(empty)} samples "
                                   f"(suite.{empty[0]}_samples, or the split's labels)")
                continue
            metrics.update(_train_heads(p, cfg, device))
    return {"metrics": metrics, "skipped": skipped, "seconds": round(time.time() - t0, 3), "forwards": forwards}
