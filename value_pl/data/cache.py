"""Feature cache: run the frozen backbone once, train probers many times.

``python -m value_pl.extract task=vrc prober=layer_emb data.root=SHARDS cache.root=CACHE`` writes, per split,
WebDataset shards that mirror the source shards one to one (same names, same sample order), holding for
every source sample the inputs of every prober head for its pairs:

* ``<key>.labels.npy``   -- int64 ``(P,)`` labels of the sample's pairs (after the collator's filtering);
* ``<key>.hNNN_J.npy``   -- head ``NNN`` (index into ``manifest["cache"]["heads"]``), input ``J`` of the
  head: for ``emb:<layer>`` the side-a and side-b embeddings ``(P, D)``, for ``attn:<layer>`` the attention
  vectors ``(P, H)`` of a->b and b->a; fp16 by default (``cache.dtype=float32`` for exact reproduction);
* ``<key>.info.json``    -- ``{"pairs_dropped": n}``.

Only ``.npy`` (``allow_pickle=False``) and JSON: no pickle. ``manifest.json`` keeps the source manifest's
``splits``/``labels`` (so :class:`~value_pl.data.datamodule.ShardDataModule` reads a cache like any shard set,
with the same detshuffle / split_by_node / with_epoch pipeline) plus ``cache``: the identity of what was
extracted (backbone checksum, task, prober, heads, dtype, precision, relabelling).

``train data.cache=CACHE`` then feeds ``{"cached_features": {head: tuple}, "labels": ...}`` batches to
:class:`~value_pl.probers.module.ProbeModule` instead of running the backbone. Because the shards mirror the
source and the sample shuffle is seeded, cached training sees the same batches as online training with the
same seed. A cache whose backbone checksum, task, labels, relabelling or heads do not match the run is refused.
"""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from .schema import decode_sample, load_manifest
from .writer import sha256_file

log = logging.getLogger(__name__)

FORMAT = "value-pl-feature-cache"
VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}


# ------------------------------------------------------------------ identity
def cache_identity(module, cfg, dtype: str, precision: str) -> dict:
    ident = module.backbone.describe()
    return {
        "backbone": {k: ident.get(k) for k in ("family", "name", "checksum", "pretrained", "seed", "layers",
                                                "hidden", "heads")},
        "task": {"name": module.task["name"], "kind": module.kind, "labels": list(module.labels)},
        "prober": module.prober_name,
        "heads": list(module.head_names),
        "dtype": dtype,
        "precision": precision,
        "control": bool(cfg.get("control", False)),
        "shuffle_labels": bool(cfg.get("shuffle_labels", False)),
        "label_seed": int(cfg.seed) if (cfg.get("control", False) or cfg.get("shuffle_labels", False)) else None,
    }


def check_cache(manifest: dict, module, cfg, root: str | Path = "?") -> None:
    """Refuse a cache that was extracted for another backbone / task / prober / layers / relabelling."""
    c = manifest.get("cache")
    if manifest.get("format") != FORMAT or not c:
        raise ValueError(f"{root} is not a feature cache (write one with python -m value_pl.extract)")
    want = cache_identity(module, cfg, c.get("dtype", "float16"), c.get("precision", "32"))
    errs = []
    cb, wb = c["backbone"], want["backbone"]
    if cb.get("checksum") != wb.get("checksum"):
        errs.append(f"backbone {cb.get('name')} checksum {cb.get('checksum')} != the configured backbone "
                    f"{wb.get('name')} checksum {wb.get('checksum')}")
    if c["task"] != want["task"]:
        errs.append(f"task {c['task']['name']} ({len(c['task']['labels'])} labels) != {want['task']['name']} "
                    f"({len(want['task']['labels'])} labels)")
    for k in ("control", "shuffle_labels", "label_seed"):
        if c.get(k) != want[k]:
            errs.append(f"{k}={c.get(k)} != {want[k]}")
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
    """Raw cache record -> ``{"key", "labels", "inputs": {(head, j): array}, "pairs_dropped"}``."""
    key = sample.get("__key__", "?")
    out = {"key": key, "inputs": {}, "pairs_dropped": 0}
    for name, raw in sample.items():
        if name.startswith("__"):
            continue
        if name == "labels.npy":
            out["labels"] = np.load(io.BytesIO(raw), allow_pickle=False)
        elif name == "info.json":
            out["pairs_dropped"] = int(json.loads(raw).get("pairs_dropped", 0))
        elif name.startswith("h") and name.endswith(".npy"):
            h, j = name[1:-4].split("_")
            out["inputs"][(int(h), int(j))] = np.load(io.BytesIO(raw), allow_pickle=False)
    if "labels" not in out:
        raise ValueError(f"{sample.get('__url__', '?')}: cache record {key} lacks labels.npy")
    return out


class CacheCollate:
    """Cache records -> the batch :class:`ProbeModule` trains on (``cached_features`` instead of inputs)."""

    def __init__(self, cache_heads: list[str], head_shapes: dict, wanted: list[str]):
        self.index = {h: i for i, h in enumerate(cache_heads)}
        self.head_shapes = head_shapes
        self.wanted = list(wanted)

    def __call__(self, records: list[dict]) -> dict:
        labels = np.concatenate([r["labels"] for r in records]) if records else np.zeros(0, np.int64)
        feats = {}
        for h in self.wanted:
            i = self.index[h]
            parts = []
            for j, shape in enumerate(self.head_shapes[h]):
                arrs = [r["inputs"][(i, j)] for r in records if len(r["labels"])]
                a = np.concatenate(arrs) if arrs else np.zeros((0, *shape), np.float32)
                parts.append(torch.from_numpy(a.astype(np.float32, copy=False)))
            feats[h] = tuple(parts)
        return {"cached_features": feats, "labels": torch.from_numpy(labels.astype(np.int64)),
                "pairs_dropped": torch.tensor(sum(r["pairs_dropped"] for r in records)),
                "keys": [r["key"] for r in records]}


def attach_cache(dm, module, cfg) -> None:
    """Point a :class:`ShardDataModule` opened on a cache at the cache collate (after checking identity)."""
    check_cache(dm.manifest, module, cfg, dm.root)
    c = dm.manifest["cache"]
    dm.collate = CacheCollate(c["heads"], c["head_shapes"], module.head_names)


# ------------------------------------------------------------------- writing
def _decode_with_url(sample: dict) -> dict:
    out = decode_sample(sample)
    out["url"] = sample.get("__url__")
    return out


class _UrlCollate:
    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        batch = self.collate(samples)
        batch["urls"] = [s["url"] for s in samples]
        return batch


def _rows_per_sample(module, batch: dict, B: int) -> list[slice]:
    if module.kind == "sentence":
        return [slice(b, b + 1) for b in range(B)]
    counts = torch.bincount(batch["pair_b"].cpu(), minlength=B).tolist() if batch["pair_b"].numel() else [0] * B
    out, o = [], 0
    for c in counts:  # the collator emits pairs sample by sample
        out.append(slice(o, o + c))
        o += c
    return out


def write_split(module, dm, stage: str, out: Path, dtype: str = "float16", device: str = "cpu",
                bf16: bool = False, num_workers: int = 0) -> dict:
    """Extract one split; returns its manifest entry and the heads' input shapes."""
    npdt = DTYPES[dtype]
    urls = dm.urls(stage)
    pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(),
                            wds.map(_decode_with_url),
                            wds.batched(dm.eval_batch_size, collation_fn=_UrlCollate(dm.collate), partial=True))
    workers = min(num_workers, len(urls))
    loader = wds.WebLoader(pipe, batch_size=None, num_workers=workers)
    names = {u: Path(u).name for u in urls}
    writers: dict[str, wds.TarWriter] = {}
    n, shapes = 0, {}
    from lightning_fabric.utilities.apply_func import move_data_to_device

    try:
        for batch in loader:
            B = len(batch["keys"])
            dev_batch = move_data_to_device({k: v for k, v in batch.items() if k != "urls"}, device)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                feats = module.extract(dev_batch)
            feats = {h: tuple(t.float().cpu().numpy() for t in v) for h, v in feats.items()}
            for h, v in feats.items():
                shapes.setdefault(h, [list(t.shape[1:]) for t in v])
            labels = batch["labels"].cpu().numpy().astype(np.int64)
            rows = _rows_per_sample(module, batch, B)
            dropped = int(batch.get("pairs_dropped", 0))
            for b in range(B):
                url = batch["urls"][b]
                if url not in writers:
                    writers[url] = wds.TarWriter(str(out / names[url]), mtime=0.0, user="value", group="value")
                sl = rows[b]
                rec = {"__key__": batch["keys"][b], "labels.npy": _npy(labels[sl]),
                       "info.json": json.dumps({"pairs_dropped": dropped if b == 0 else 0}).encode()}
                for i, h in enumerate(module.head_names):
                    if h in feats:
                        for j, t in enumerate(feats[h]):
                            rec[f"h{i:03d}_{j}.npy"] = _npy(t[sl].astype(npdt))
                    elif sl.stop > sl.start:
                        raise RuntimeError(f"extract() returned no input for head {h}")
                writers[url].write(rec)
                n += 1
    finally:
        for w in writers.values():
            w.close()
    for u in urls:  # a source shard with no samples still gets its (empty) mirror
        if u not in writers:
            wds.TarWriter(str(out / names[u])).close()
    return {"samples": n, "shards": [names[u] for u in urls]}, shapes


def extract_cache(cfg) -> dict:
    """Build backbone + module from ``cfg`` (like ``train``) and write the cache to ``cfg.cache.root``."""
    from omegaconf import OmegaConf

    from ..pipeline import build_module, make_datamodule

    t0 = time.time()
    cc = cfg.cache
    dtype = str(cc.get("dtype", "float16"))
    if dtype not in DTYPES:
        raise ValueError(f"cache.dtype={dtype!r}: use float16 or float32")
    cfg = OmegaConf.merge(cfg, {"data": {"cache": None}})
    dm = make_datamodule(cfg)
    module, _ = build_module(cfg, dm)
    device = str(cc.get("device") or "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = str(cfg.trainer.get("precision", "32") or "32")
    bf16 = device.startswith("cuda") and precision.startswith("bf16")
    module.to(device)
    out = Path(cc.root)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    splits, shapes = {}, {}
    stages = list(cc.get("splits") or ["train", "val", "test"])
    for stage in stages:
        split = dm.splits[stage]
        entry, sh = write_split(module, dm, stage, tmp, dtype, device, bf16, int(cfg.data.get("num_workers", 0)))
        entry["pairs"] = dm.manifest["splits"][split].get("pairs", {})
        splits[split] = entry
        shapes.update(sh)
        print(f"[value-pl] cache {split}: {entry['samples']} samples, {len(entry['shards'])} shard(s)")
    missing = [h for h in module.head_names if h not in shapes]
    if missing:
        raise RuntimeError(f"no pair in the extracted splits produced inputs for heads {missing}")
    ident = cache_identity(module, cfg, dtype, "bf16-mixed" if bf16 else "32")
    ident["head_shapes"] = {h: shapes[h] for h in module.head_names}
    man = {k: v for k, v in dm.manifest.items() if k not in ("splits", "inputs")}
    man.update(format=FORMAT, version=VERSION, splits=splits, cache=ident,
               source={"root": str(dm.root), "manifest_sha256": sha256_file(Path(dm.root) / "manifest.json")[:16]},
               seconds=round(time.time() - t0, 1))
    (tmp / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(f"[value-pl] feature cache written to {out} ({dtype}, {len(module.head_names)} head inputs, "
          f"{time.time() - t0:.1f}s)")
    return man


def open_cache(root: str | Path) -> dict:
    man = load_manifest(root)
    if man.get("format") != FORMAT:
        raise ValueError(f"{root}: not a feature cache (manifest has no format={FORMAT!r})")
    return man
