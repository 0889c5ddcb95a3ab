"""``python -m value_pl.compare``: the probe suite over the checkpoints of one backbone family.

For every checkpoint (ordered by training step) the backbone is built with ``backbone.checkpoint``
(files: UNITER ``.pt``, LXMERT ``.pth``) or ``backbone.path`` (HF directories) set to it, the suite
(:mod:`value_pl.compare.suite`) runs, and the row is cached under ``<cache>/<sha256(checkpoint)>-<sha256(suite)>.json``
(the second hash also covers the other backbone.* fields with the files they name, the model config the backbone
is built with, and the data);
a re-run loads cached rows and builds no backbone for them. Outputs: ``compare.json``, ``compare.md``,
``plots/<metric>.png`` (one line plot per metric against the step), and one logger run (W&B: one group,
the checkpoint step as x-axis).
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..data.progress import progress
from ..data.safe_load import honours_switch
from .suite import SuiteData, run_suite, suite_config, suite_hash
from .checkpoints import changed, checksum, discover

log = logging.getLogger("value_pl")

#: backbone.* fields that name files: apart from the one the checkpoint under comparison replaces, they stay in the
#: cache key, with the content of what they point at
FILE_FIELDS = ("path", "checkpoint", "config", "tokenizer")
#: files up to this size are hashed by content in the cache key; larger ones (weights next to a tokenizer) by size
CONTENT_HASH_LIMIT = 32 << 20


def weights_key(cfg: DictConfig, ck) -> str:
    """The backbone.* field a checkpoint replaces: ``checkpoint`` (files) or ``path`` (directories)."""
    key = cfg.get("checkpoint_key", "auto")
    if key in (None, "auto"):
        key = "path" if ck.is_dir else "checkpoint"
    return str(key)


def backbone_cfg_for(cfg: DictConfig, ck) -> DictConfig:
    key = weights_key(cfg, ck)
    b = OmegaConf.to_container(cfg.backbone, resolve=True)
    if key == "path" and b.get("family") != "bert":
        b["checkpoint"] = None  # a directory is the whole model
    b[key] = ck.path
    b["pretrained"] = True
    return OmegaConf.create(b)


def file_identity(value) -> dict | str | None:
    """What a backbone.* file field points at, for the cache key: a file's sha256, or a directory's top-level
    files (name -> sha256; files over :data:`CONTENT_HASH_LIMIT`, such as weights, by size). None when unset
    or missing (the build then fails or does not use it); the field's own value stays in the key as well."""
    from ..backbones.common import resolve_path
    from ..data.hashing import sha256_file
    from .checkpoints import IGNORED_IN_DIR

    try:
        p = resolve_path(value)
    except Exception:  # noqa: BLE001 - e.g. "minilm" without its package: the build reports it
        return None
    if not p or not Path(p).exists():
        return None
    p = Path(p)

    def one(f: Path) -> str:
        size = f.stat().st_size
        return sha256_file(f) if size <= CONTENT_HASH_LIMIT else f"size={size}"

    if p.is_file():
        return one(p)
    return {f.name: one(f) for f in sorted(p.iterdir()) if f.is_file() and f.name not in IGNORED_IN_DIR}


def backbone_fields(cfg: DictConfig, ck) -> dict:
    """The backbone.* fields of a checkpoint's cache key. Only the field the checkpoint replaces
    (:func:`weights_key`: its bytes are the other half of the key) is left out; the other file fields
    (``path`` of a .pt comparison, ``config``, ``tokenizer`` ...) stay, with the content they point at."""
    b = OmegaConf.to_container(backbone_cfg_for(cfg, ck), resolve=True)
    b.pop(weights_key(cfg, ck), None)
    b.pop("name", None)
    if b.get("checkpoint_prefix") is None:  # unset: the key of caches written before the configs had this field
        b.pop("checkpoint_prefix", None)
    b["contents"] = {k: file_identity(b.get(k)) for k in FILE_FIELDS if b.get(k) not in (None, "", "null")}
    return b


def model_config_key(cfg: DictConfig, ck) -> dict | str | None:
    """The model config the checkpoint's backbone is built with (:func:`~value_pl.backbones.configured_model_config`:
    config file or the checkpoint directory's config.json read through transformers, with its defaults for fields
    the file leaves out, and the attention implementation the builder sets), read without loading weights. A config
    that cannot be read gives the error's name: the build then fails and says why, and nothing is cached."""
    from ..backbones import configured_model_config

    try:
        return configured_model_config(backbone_cfg_for(cfg, ck))
    except Exception as e:  # noqa: BLE001 - the build reports it with the checkpoint it is about
        return f"unreadable ({type(e).__name__})"


def cache_identity(cfg: DictConfig, suite: dict, data_ident: dict, ck, fields: dict | None = None) -> str:
    """The suite/backbone/data half of a checkpoint's cache key: :func:`backbone_fields` (``fields`` when already
    computed for this kind of checkpoint), the checkpoint's :func:`model_config_key` (what the same files would
    compute under another transformers default or attention implementation) and the data's identity."""
    b = dict(fields if fields is not None else backbone_fields(cfg, ck))
    b["model_config"] = model_config_key(cfg, ck)
    return suite_hash(suite, {"backbone": b, "data": data_ident})


def data_identity(cfg: DictConfig) -> dict:
    from ..data.schema import load_manifest

    root = Path(cfg.data.root)
    m = load_manifest(root)
    return {"root": str(root.resolve()), "dataset": m.get("dataset"), "version": m.get("version"),
            "seed": m.get("seed"), "splits": {k: v.get("samples") for k, v in m["splits"].items()},
            "roles": OmegaConf.to_container(cfg.data.splits) if cfg.data.get("splits") else None}


def read_cached(cfile: Path, say) -> dict | None:
    """A cached row, or None: absent, or unreadable (a run killed while writing it, a file damaged since),
    which is said and then measured again instead of failing every later run."""
    try:
        row = json.loads(cfile.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        say(f"[value-pl] cache row {cfile} is unreadable ({e}): measured again")
        return None
    if not isinstance(row, dict) or not isinstance(row.get("metrics"), dict):
        say(f"[value-pl] cache row {cfile} has no metrics: measured again")
        return None
    return row


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``: a concurrent run sharing the
    cache, or this one killed mid-write, never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ChecksumMemo:
    """``<cache>/checksums.json``: each checkpoint's sha256 under the signature (size, mtime, inode of its files) it
    had when hashed, so that a re-run -- ``compare`` run again while a pretraining run keeps saving -- reads again
    only the checkpoints that are new or changed, not every byte of every one. A damaged memo is said and
    rebuilt."""

    def __init__(self, cache: Path, say):
        self.path = cache / "checksums.json"
        self.say = say
        try:
            memo = json.loads(self.path.read_text())
        except FileNotFoundError:
            memo = {}
        except (ValueError, UnicodeDecodeError) as e:
            say(f"[value-pl] checksum memo {self.path} is unreadable ({e}): checkpoints are hashed again")
            memo = {}
        self.memo = memo if isinstance(memo, dict) else {}

    @staticmethod
    def _sig(ck) -> list | None:
        return None if ck.signature is None else json.loads(json.dumps(ck.signature))

    def get(self, ck) -> str | None:
        e = self.memo.get(os.path.abspath(ck.path))
        sig = self._sig(ck)
        if sig is not None and isinstance(e, dict) and e.get("signature") == sig and isinstance(e.get("sha256"), str):
            return e["sha256"]
        return None

    def put(self, ck, csum: str) -> None:
        """Only for a checkpoint found unchanged since it was listed (its signature is that of the hashed bytes)."""
        sig = self._sig(ck)
        if sig is None or self.get(ck) == csum:
            return
        self.memo[os.path.abspath(ck.path)] = {"signature": sig, "sha256": csum}
        write_atomic(self.path, json.dumps(self.memo, indent=0, sort_keys=True) + "\n")


def pick_device(name) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(res: dict) -> str:
    rows = res["rows"]
    names = sorted({k for r in rows for k in r["metrics"]})
    summary = [n for n in names if "/layer_" not in n]
    per_layer = [n for n in names if "/layer_" in n]
    b = res["backbone"]
    lines = [f"# Checkpoint comparison / backbone family={b.get('family')} name={b.get('name')} / "
             f"suite={res['suite'].get('name')}", "",
             f"{len(rows)} checkpoints, ordered by training step. Data: {res['data'].get('root')}"
             + (" (synthetic demo shards: a smoke test, not a result)" if res["data"].get("dataset") == "demo" else ""),
             "", "| checkpoint | step | " + " | ".join(summary) + " | computed |",
             "|---|---:|" + "---:|" * len(summary) + "---|"]
    for r in rows:
        lines.append(f"| {Path(r['checkpoint']).name} | {r['step']} | "
                     + " | ".join(_fmt(r["metrics"].get(n)) for n in summary)
                     + f" | {'yes' if r['computed'] else 'cached'} |")
    if per_layer:
        lines += ["", "## Per layer", "", "| metric | " + " | ".join(f"step {r['step']}" for r in rows) + " |",
                  "|---|" + "---:|" * len(rows)]
        for n in per_layer:
            lines.append(f"| {n} | " + " | ".join(_fmt(r["metrics"].get(n)) for r in rows) + " |")
    if res.get("not_compared"):
        lines += ["", "## Checkpoints not compared", ""] + [
            f"- {Path(c['checkpoint']).name} (step {c['step']}): {c['reason']}" for c in res["not_compared"]]
    skipped = {k: v for r in rows for k, v in r.get("skipped", {}).items()}
    if skipped:
        lines += ["", "## Not measured", ""] + [f"- {k}: {v}" for k, v in skipped.items()]
    lines += ["", "Metrics: `fusion/nmi/*` k-means NMI (lower = more fused), `modality/*` [CLS] attention mass "
                  "(Eq. 1), `<task>/acc/*` test accuracy of the layer-embedding prober (Eq. 4; sentence tasks: "
                  "logistic regression on the layer's mean word vector) trained with the "
                  "suite's fixed budget; `best` = the head best on validation.", ""]
    if res.get("plots"):
        lines += ["## Plots", ""] + [f"![{n}]({p})" for n, p in res["plots"].items()]
    return "\n".join(lines) + "\n"


def plot_name(metric: str) -> str:
    return metric.replace("/", "__")


def plots(rows: list[dict], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = sorted({k for r in rows for k in r["metrics"]})
    xs = [r["step"] for r in rows]
    done = {}
    for n in names:
        ys = [r["metrics"].get(n, math.nan) for r in rows]
        fig, ax = plt.subplots(figsize=(4.5, 3.0))
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel("training step")
        ax.set_ylabel(n)
        ax.set_title(n, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / f"{plot_name(n)}.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        done[n] = f"{out.name}/{p.name}"
    return done


def log_rows(logger, rows: list[dict]) -> None:
    """One logger run: every checkpoint's metrics at its training step. Under W&B every metric is charted against
    ``compare/step`` (the checkpoint's training step, not the logging order), each summary metric (no
    ``/layer_``) also gets a line chart ``compare/chart/<metric>`` (metric vs step), and ``compare/rows`` is the
    table of all rows."""
    if not logger:
        return
    try:
        names = sorted({k for r in rows for k in r["metrics"]})
        summary = [n for n in names if "/layer_" not in n]
        run = _wandb_run(logger)
        if run is not None:
            run.define_metric("compare/step")
            for n in names:
                run.define_metric(n, step_metric="compare/step")
        for r in rows:
            m = {k: v for k, v in r["metrics"].items() if v == v}
            m["compare/step"] = r["step"]
            logger.log_metrics(m, step=int(r["step"]))
        if hasattr(logger, "log_table"):
            logger.log_table(key="compare/rows", columns=["checkpoint", "step", *summary],
                             data=[[Path(r["checkpoint"]).name, r["step"], *[r["metrics"].get(n) for n in summary]]
                                   for r in rows])
        if run is not None:
            import wandb

            for n in summary:
                pts = [[r["step"], r["metrics"][n]] for r in rows if r["metrics"].get(n) == r["metrics"].get(n)
                       and r["metrics"].get(n) is not None]
                table = wandb.Table(columns=["step", n], data=pts)
                run.log({f"compare/chart/{n}": wandb.plot.line(table, "step", n, title=f"{n} vs training step")})
    except Exception as e:  # noqa: BLE001 - a dashboard must never fail a run
        log.warning("could not log the comparison: %s", e)


def _wandb_run(logger):
    from pytorch_lightning.loggers import WandbLogger

    return logger.experiment if isinstance(logger, WandbLogger) else None


@honours_switch
def compare(cfg: DictConfig) -> dict:
    from ..backbones import build_backbone
    from ..backbones.checks import check_inputs
    from ..driver.setup import close_logger, ensure_demo, make_logger, run_dir
    from ..driver.validate import check_compare

    check_compare(cfg)  # value ranges, before any file is read (the suite's: suite_config)
    t0 = time.time()
    rdir = Path(cfg.out) if cfg.get("out") else run_dir(cfg)
    rdir.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.get("cache_dir") else rdir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    ensure_demo(cfg.data.root, cfg.data)
    suite = suite_config(cfg.suite)
    steps = OmegaConf.to_container(cfg.steps) if cfg.get("steps") is not None else None
    specs = cfg.checkpoints
    specs = OmegaConf.to_container(specs) if OmegaConf.is_config(specs) else specs
    cks = discover(specs, steps)
    data_ident = data_identity(cfg)
    fields: dict[str, dict] = {}  # the backbone.* fields of the key depend on which field the checkpoint replaces
    device = pick_device(cfg.get("device"))
    data = None
    rows = []
    built = 0
    not_compared: list[dict] = []  # checkpoints that changed or went away after they were listed

    def skip(ck, why: str) -> None:
        not_compared.append({"checkpoint": ck.path, "step": ck.step, "reason": why})
        bar.write(f"[value-pl] {ck.name} (step {ck.step}): not compared, {why}; nothing cached, a re-run measures it")

    bar = progress(cks, enabled=bool(cfg.get("progress", True)), unit="ckpt", desc="compare")
    memo = ChecksumMemo(cache, bar.write)
    for ck in bar:
        # every row's bytes are those the checkpoint had when listed (its step was read then): a file the trainer
        # is still writing, or has replaced or deleted since (last.ckpt, save_top_k), is skipped, not mislabelled
        try:
            csum = memo.get(ck) or checksum(ck.path)
        except FileNotFoundError:
            csum = None
        why = changed(ck) or (None if csum else "removed since it was listed")
        if why:
            skip(ck, why)
            continue
        memo.put(ck, csum)
        wkey = weights_key(cfg, ck)
        if wkey not in fields:
            fields[wkey] = backbone_fields(cfg, ck)
        sid = cache_identity(cfg, suite, data_ident, ck, fields[wkey])
        cfile = cache / f"{csum[:32]}-{sid[:32]}.json"
        row = read_cached(cfile, bar.write)
        if row is not None:
            row.update(checkpoint=ck.path, step=ck.step, step_source=ck.step_source, computed=False)
            bar.write(f"[value-pl] {ck.name} (step {ck.step}): cached ({cfile.name})")
            rows.append(row)
            continue
        if data is None:
            roles = OmegaConf.to_container(cfg.data.splits) if cfg.data.get("splits") else None
            data = SuiteData.load(cfg.data.root, suite, roles)
        t1 = time.time()
        bcfg = backbone_cfg_for(cfg, ck)
        try:
            backbone = build_backbone(bcfg, img_dim=data.manifest.get("feature_dim"))
        except Exception as e:
            why = changed(ck)
            if why is None:  # the file is as listed: a real error, said with the checkpoint it is about
                e.add_note(f"[value-pl] compare: while loading checkpoint {ck.path} (step {ck.step})")
                raise
            skip(ck, why)
            continue
        why = changed(ck)  # written to while it was hashed or loaded
        if why:
            del backbone
            skip(ck, why)
            continue
        check_inputs(backbone, data.manifest, data.root)  # before the first batch
        built += 1
        backbone.to(device)
        tb = time.time() - t1
        res = run_suite(backbone, suite, data)
        row = {"checkpoint": ck.path, "step": ck.step, "step_source": ck.step_source, "checksum": csum,
               "weights_checksum": backbone.describe().get("checksum"),
               "config_sha256": backbone.describe().get("config_sha256"), "suite": suite.get("name"),
               "metrics": res["metrics"], "skipped": res["skipped"], "forwards": res["forwards"],
               "seconds": {"build": round(tb, 3), "suite": res["seconds"], "total": round(time.time() - t1, 3)},
               "device": str(device), "computed": True}
        write_atomic(cfile, json.dumps(row, indent=1, default=float) + "\n")
        summ = ", ".join(f"{k}={v:.3f}" for k, v in res["metrics"].items() if "/layer_" not in k)
        bar.write(f"[value-pl] {ck.name} (step {ck.step}): {summ} [{row['seconds']['total']:.1f} s]")
        rows.append(row)
        del backbone
        gc.collect()
    bar.close()
    rows.sort(key=lambda r: (r["step"], r["checkpoint"]))
    b = OmegaConf.to_container(cfg.backbone, resolve=True)
    res = {"backbone": {"family": b.get("family"), "name": b.get("name")}, "suite": suite,
           "data": data_ident, "rows": rows, "built": built, "cache": str(cache), "not_compared": not_compared}
    if cfg.get("plots", True):
        res["plots"] = plots(rows, rdir / "plots")
    res["seconds"] = round(time.time() - t0, 2)
    (rdir / "compare.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    md = markdown(res)
    (rdir / "compare.md").write_text(md)
    print(md)
    print(f"[value-pl] {len(rows)} checkpoints ({built} measured, {len(rows) - built} cached"
          + (f", {len(not_compared)} not compared: changed or removed since listed" if not_compared else "")
          + f") in {res['seconds']} s -> {rdir}")
    lc = cfg.get("logger")
    if lc and lc.get("name") == "wandb":
        cfg = OmegaConf.merge(cfg, {"logger": {"group": lc.get("group") or f"compare-{b.get('name')}",
                                               "run_name": lc.get("run_name") or f"compare-{b.get('name')}"}})
    logger = make_logger(cfg, rdir)
    log_rows(logger, rows)
    close_logger(logger, cfg)
    return res
