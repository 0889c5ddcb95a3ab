"""Feature cache: run the frozen backbone once, train probers many times.

``python -m value_pl.extract task=vrc prober=layer_emb data.root=SHARDS cache.root=CACHE`` writes, per split,
WebDataset shards that mirror the source shards one to one (same names, same sample order), holding for
every source sample the inputs of every prober head for its pairs:

* ``<key>.labels.npy``   -- int64 ``(P,)`` labels of the sample's pairs (after the collator's filtering);
* ``<key>.hNNN_J.npy``   -- head ``NNN`` (index into ``manifest["cache"]["heads"]``), input ``J`` of the
  head: for ``emb:<layer>`` the side-a and side-b embeddings ``(P, D)``, for ``attn:<layer>`` the attention
  vectors ``(P, H)`` of a->b and b->a; fp16 by default (``cache.dtype=float32`` for exact reproduction);
* ``<key>.info.json``    -- ``{"counts": {...}}``: the sample's own share of the collator's counters (pairs dropped,
  text/regions truncated, phrases dropped), so any batch of cached samples counts what the same samples count
  online (shuffled, capped by ``data.train_batches`` or split over ranks alike).

Only ``.npy`` (``allow_pickle=False``) and JSON: no pickle. ``manifest.json`` keeps the source manifest's
``splits``/``labels`` (so :class:`~value_pl.data.datamodule.ShardDataModule` reads a cache like any shard set,
with the same exact sample ranges per rank and worker) plus ``cache``: the identity of what was
extracted (backbone checksum, effective model config, tokenizer, text/region limits, task, prober, heads, dtype,
precision, relabelling and its seed: a run that differs in any is refused). Extraction refuses head inputs that are not
finite or overflow the cache's dtype.

``train data.cache=CACHE`` then feeds batches of ``{"cached_flat", "cached_layout", "labels", ...}`` to
:class:`~value_pl.probers.module.ProbeModule` instead of running the backbone: every head input of the batch in one
tensor of the cache's dtype (one shared-memory segment from a loader worker, fp16 by default: half the bytes of
float32), which :func:`unpack_cached` views per head and converts to float32 on the device. Because the shards
mirror the source and the sample shuffle is seeded, cached training sees the same batches as online training with
the same seed. A cache whose backbone checksum, model config, tokenizer, task, labels, relabelling or heads do not
match the run is refused, naming the fields that differ.

The model config is :meth:`~value_pl.backbones.base.Backbone.effective_config`: every field of the backbone's HF
config that can change its outputs (``layer_norm_eps``, ``hidden_act``, ``num_attention_heads``,
``max_position_embeddings``, LXMERT's ``l_layers``/``x_layers``/``r_layers`` ...), the attention implementation,
the weights' dtype and UNITER's ``img_dim``; bookkeeping (``_name_or_path``, ``transformers_version``,
``architectures``, the config's ``dtype``), dropout, initialisation-only and task-head fields are left out
(:data:`~value_pl.backbones.base.CONFIG_FIELDS_IGNORED`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .collate import label_histogram
from .handover import batch_tensor
from .hashing import canonical_sha256, field_differences, one_sided_fields, sha256_file
from .schema import SchemaError, load_manifest

log = logging.getLogger(__name__)

FORMAT = "value-pl-feature-cache"
VERSION = 5  # 2: info.json holds the batch counters; 3: the identity holds the backbone's input limits;
# 4: info.json holds each sample's own counters, the identity the tokenizer and the control task's own seed;
# 5: the identity holds the backbone's effective model config (``config``, ``config_sha256``)
DTYPES = {"float16": np.float16, "float32": np.float32}


# ------------------------------------------------------------------ identity
#: what, besides the weights, shapes a backbone's features: the text limit (texts cut there), the regions kept and
#: the box encoding
INPUTS = ("text_limit", "max_regions", "box_mode", "tokenizer")


def tokenizer_fingerprint(tok) -> str | None:
    """sha256 (16 hex) of what turns words into token ids: the fast tokenizer's serialised normaliser, pre-tokeniser,
    vocabulary and special tokens (not its current truncation/padding state), else the vocabulary and letter case;
    None without a tokenizer. The same weights read other ids with another vocabulary or letter case."""
    if tok is None:
        return None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        d = json.loads(backend.to_str())
        d.pop("truncation", None)
        d.pop("padding", None)
        text = json.dumps(d, sort_keys=True)
    else:
        text = json.dumps([type(tok).__name__, getattr(tok, "do_lower_case", None),
                           sorted(tok.get_vocab().items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def label_seed(cfg) -> int | None:
    """The seed of the cached labels' relabelling: ``control_seed`` (else ``seed``) of a control task, ``seed`` of
    shuffled labels, None for the task's own labels (same rule as :func:`value_pl.protocols.control.control_seed`)."""
    if cfg.get("control", False):
        return int(cfg.seed if cfg.get("control_seed") is None else cfg.control_seed)
    if cfg.get("shuffle_labels", False):
        return int(cfg.seed)
    return None


#: identity fields that say which weights a checksum belongs to (named when the checksums differ)
WEIGHTS_SOURCE = ("pretrained", "seed", "checkpoint", "path")


def backbone_config(bb) -> dict:
    """The backbone's effective model config as it was built (:meth:`~value_pl.backbones.base.Backbone.record_config`;
    computed now for a backbone built without it)."""
    rec = getattr(bb, "config_record", None)
    if not rec and hasattr(bb, "effective_config"):
        rec = bb.effective_config()
    return json.loads(json.dumps(rec or {}, sort_keys=True, default=str))  # as a manifest reads it back


def run_precision(cfg) -> str:
    """The precision a run's frozen forward computes its features in: ``bf16-mixed`` (bf16 autocast, on any device,
    as Lightning's ``trainer.precision=bf16-mixed`` runs the online step) or ``32``; any other ``trainer.precision``
    (e.g. ``16-mixed``) as it is written, which no cache holds."""
    p = str((cfg.get("trainer") or {}).get("precision", "32") or "32")
    if p.startswith("bf16"):
        return "bf16-mixed"
    return "32" if p in ("32", "32-true") else p


def cache_identity(module, cfg, dtype: str, precision: str) -> dict:
    ident = module.backbone.describe()
    bb = module.backbone
    conf = backbone_config(bb)
    return {
        "backbone": {**{k: ident.get(k) for k in ("family", "name", "checksum", *WEIGHTS_SOURCE, "layers",
                                                   "hidden", "heads")},
                     "text_limit": int(bb.text_limit), "max_regions": getattr(bb, "max_regions", None),
                     "box_mode": getattr(bb, "box_mode", None),
                     "tokenizer": tokenizer_fingerprint(getattr(bb, "tokenizer", None)),
                     "config": conf, "config_sha256": canonical_sha256(conf)},
        "task": {"name": module.task["name"], "kind": module.kind, "labels": list(module.labels)},
        "prober": module.prober_name,
        "heads": list(module.head_names),
        "dtype": dtype,
        "precision": precision,
        "control": bool(cfg.get("control", False)),
        "shuffle_labels": bool(cfg.get("shuffle_labels", False)),
        "label_seed": label_seed(cfg),
    }


def _rebuilt_source(manifest: dict, cfg) -> str | None:
    """When ``data.root`` is the directory the cache was extracted from and its ``manifest.json`` changed since (the
    shards were rebuilt there), say so: the cache holds the old shards' features and labels."""
    src = manifest.get("source") or {}
    root = OmegaConf.select(cfg, "data.root", throw_on_missing=False) if OmegaConf.is_config(cfg) else None
    if not root or not src.get("root") or not src.get("manifest_sha256"):
        return None
    mpath = Path(root) / "manifest.json"
    if Path(root).resolve() != Path(src["root"]).resolve() or not mpath.is_file():
        return None
    now = sha256_file(mpath)[:16]
    if now == src["manifest_sha256"]:
        return None
    return (f"the shards at data.root={root} changed since the cache was extracted from them (their manifest.json "
            f"sha256 {now}, the cache's source {src['manifest_sha256']})")


def check_cache(manifest: dict, module, cfg, root: str | Path = "?") -> None:
    """Refuse a cache that was extracted for another backbone / task / prober / layers / relabelling / precision."""
    c = manifest.get("cache")
    if manifest.get("format") != FORMAT or not c:
        raise ValueError(f"{root} is not a feature cache (write one with python -m value_pl.extract)")
    if int(manifest.get("version", 0)) < VERSION:
        raise ValueError(f"feature cache {root} is version {manifest.get('version')}, older than this value-pl's "
                         f"{VERSION}: it does not record all that shapes its features and counts (text limit, "
                         f"max_regions, box encoding, tokenizer, each sample's counters, the backbone's model "
                         f"config), so it cannot be checked "
                         f"against this run. Re-extract it with python -m value_pl.extract.")
    want = cache_identity(module, cfg, c.get("dtype", "float16"), c.get("precision", "32"))
    errs = []
    cb, wb = c["backbone"], want["backbone"]
    if cb.get("checksum") != wb.get("checksum"):
        why = field_differences({k: cb.get(k) for k in WEIGHTS_SOURCE}, {k: wb.get(k) for k in WEIGHTS_SOURCE},
                                "cache", "configured")
        errs.append(f"backbone {cb.get('name')} checksum {cb.get('checksum')} != the configured backbone "
                    f"{wb.get('name')} checksum {wb.get('checksum')}" + (f" ({'; '.join(why)})" if why else ""))
    if cb.get("config_sha256") != wb.get("config_sha256"):  # same weights, other computation
        have, now = cb.get("config") or {}, wb.get("config") or {}
        diff = field_differences(have, now, "cache", "configured")
        if diff:
            errs.append(f"backbone model config {cb.get('config_sha256')} in the cache != {wb.get('config_sha256')} "
                        f"configured: " + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else ""))
        odd = one_sided_fields(have, now)
        if odd:  # a field another transformers version added or dropped: its value cannot be compared
            log.warning("feature cache %s: backbone config field(s) %s recorded on one side only (another "
                        "transformers version?): not compared", root, odd[:8])
    for k in INPUTS:  # features of texts cut elsewhere, of other regions, boxes or token ids are other features
        if cb.get(k) != wb.get(k):
            what = " (sha256 of its vocabulary, normaliser and special tokens)" if k == "tokenizer" else ""
            errs.append(f"backbone {k}={cb.get(k)} in the cache != {wb.get(k)} configured{what}")
    if c["task"] != want["task"]:
        errs.append(f"task {c['task']['name']} ({len(c['task']['labels'])} labels) != {want['task']['name']} "
                    f"({len(want['task']['labels'])} labels)")
    for k in ("control", "shuffle_labels", "label_seed"):
        if c.get(k) != want[k]:
            errs.append(f"{k}={c.get(k)} != {want[k]}")
    prec = run_precision(cfg)
    if c.get("precision", "32") != prec:  # the online step's features would be computed in another precision
        errs.append(f"features computed in precision {c.get('precision', '32')} in the cache != {prec} configured "
                    f"(trainer.precision)")
    stale = _rebuilt_source(manifest, cfg)
    if stale:
        errs.append(stale)
    missing = [h for h in want["heads"] if h not in c["heads"]]
    if missing:
        errs.append(f"prober={want['prober']} needs head input(s) {missing[:6]}"
                    + (" ..." if len(missing) > 6 else "")
                    + f" that the cache (prober={c['prober']}, heads {c['heads'][:4]}...) does not hold")
    if errs:
        raise ValueError(f"feature cache {root} does not match this run: " + "; ".join(errs)
                         + ". Re-extract with python -m value_pl.extract and the same overrides.")


# ------------------------------------------------------------------- records
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def decode_record(sample: dict) -> dict:
    """Raw cache record -> ``{"key", "labels", "inputs": {(head, j): array}, "counts"}``; a damaged member is a
    :class:`~value_pl.data.schema.SchemaError` naming the shard, the record and the member."""
    key = sample.get("__key__", "?")
    url = sample.get("__url__", "?")
    out = {"key": key, "inputs": {}, "counts": {}}
    for name, raw in sample.items():
        if name.startswith("__"):
            continue
        try:
            if name == "labels.npy":
                out["labels"] = np.load(io.BytesIO(raw), allow_pickle=False)
            elif name == "info.json":
                info = json.loads(bytes(raw))  # (a mapped shard's member: a memoryview)
                out["counts"] = info.get("counts") or {"pairs_dropped": int(info.get("pairs_dropped", 0))}
            elif name.startswith("h") and name.endswith(".npy"):
                h, j = name[1:-4].split("_")
                out["inputs"][(int(h), int(j))] = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - re-raised with the file, record and member
            raise SchemaError(f"{url}: cache record {key}: {name}: {type(e).__name__}: {e}") from e
    if "labels" not in out:
        raise SchemaError(f"{url}: cache record {key} lacks labels.npy")
    return out


class CacheCollate:
    """Cache records -> the batch :class:`ProbeModule` trains on: ``cached_flat`` (every head input of the batch,
    in the cache's dtype, one tensor) and ``cached_layout`` [(head, input, offset, shape)] instead of model inputs."""

    def __init__(self, cache_heads: list[str], head_shapes: dict, wanted: list[str], dtype: str = "float16"):
        self.index = {h: i for i, h in enumerate(cache_heads)}
        self.head_shapes = head_shapes
        self.wanted = list(wanted)
        self.dtype = np.dtype(DTYPES.get(dtype, np.float32))

    @staticmethod
    def counts(records: list[dict], labels: np.ndarray) -> dict[str, int]:
        out = {"samples": len(records), "pairs": int(labels.shape[0])}
        for r in records:
            for k, v in r["counts"].items():
                if k not in ("samples", "pairs"):
                    out[k] = out.get(k, 0) + int(v)
        return out

    @staticmethod
    def _input(record: dict, head: int, j: int, shape: tuple) -> np.ndarray:
        """The record's input ``j`` of head ``head``: ``(pairs, *shape)`` (never a bare KeyError or a shape error of
        the concatenation)."""
        a = record["inputs"].get((head, j))
        if a is not None and a.shape[1:] == shape and a.shape[0] == len(record["labels"]):
            return a
        url = (record.get("source") or ("?",))[0]
        if a is None:
            what = (f"missing (the record holds {['h%03d_%d.npy' % k for k in sorted(record['inputs'])][:6]})")
        else:
            what = (f"shape {a.shape}, expected {(len(record['labels']), *shape)} ({len(record['labels'])} pair "
                    f"label(s), manifest.json's head_shapes)")
        raise SchemaError(f"{url}: cache record {record['key']}: h{head:03d}_{j}.npy: {what}; re-extract the cache "
                          f"with python -m value_pl.extract")

    def __call__(self, records: list[dict]) -> dict:
        labels = np.concatenate([r["labels"] for r in records]) if records else np.zeros(0, np.int64)
        layout, parts, n = [], [], 0
        for h in self.wanted:
            i = self.index[h]
            for j, shape in enumerate(self.head_shapes[h]):
                shape = tuple(int(d) for d in shape)
                arrs = [self._input(r, i, j, shape) for r in records if len(r["labels"])]
                a = np.concatenate(arrs) if arrs else np.zeros((0, *shape), self.dtype)
                layout.append((h, j, n, tuple(int(d) for d in a.shape)))
                parts.append(a)
                n += a.size
        flat = batch_tensor((n,), self.dtype)  # in a loader worker: one shared segment (or a reused buffer)
        out = flat.numpy()
        for (_, _, off, _), a in zip(layout, parts):
            out[off:off + a.size] = a.reshape(-1)
        return {"cached_flat": flat, "cached_layout": layout, "labels": torch.from_numpy(labels.astype(np.int64)),
                "label_counts": label_histogram(labels), "counts": self.counts(records, labels),
                "keys": [r["key"] for r in records]}


def unpack_cached(batch: dict) -> dict[str, tuple]:
    """``{head: (input tensors)}`` in float32 from a :class:`CacheCollate` batch (views of ``cached_flat``, converted
    where the batch is: on the device after the transfer)."""
    flat = batch["cached_flat"]
    out: dict[str, list] = {}
    for h, j, off, shape in batch["cached_layout"]:
        n = int(np.prod(shape))
        out.setdefault(h, []).append(flat[off:off + n].view(shape).float())
    return {h: tuple(v) for h, v in out.items()}


def attach_cache(dm, module, cfg) -> None:
    """Point a :class:`ShardDataModule` opened on a cache at the cache collate (after checking identity)."""
    check_cache(dm.manifest, module, cfg, dm.root)
    c = dm.manifest["cache"]
    dm.collate = CacheCollate(c["heads"], c["head_shapes"], module.head_names, c.get("dtype", "float16"))


def open_cache(root: str | Path) -> dict:
    man = load_manifest(root)
    if man.get("format") != FORMAT:
        raise ValueError(f"{root}: not a feature cache (manifest has no format={FORMAT!r})")
    return man
