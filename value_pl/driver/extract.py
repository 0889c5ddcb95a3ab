"""The feature-cache writer (``python -m value_pl.extract``): one frozen forward per batch, every head's inputs
stored per source sample in shards that mirror the source shards (format: :mod:`value_pl.data.cache`)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from lightning_fabric.utilities.apply_func import move_data_to_device
from omegaconf import OmegaConf

from ..data.cache import DTYPES, FORMAT, VERSION, _npy, cache_identity, run_precision
from ..data.hashing import sha256_file
from ..data.progress import progress as progress_bar
from ..data.safe_load import honours_switch
from .setup import build_module, cuda_defaults, make_datamodule
from .validate import check_run


#: the collator's counters that a sample can add to (samples/pairs are recounted from the cache's records)
SAMPLE_COUNTERS = ("pairs_dropped", "texts_truncated", "phrases_dropped", "regions_truncated")


class _SourceCollate:
    """The backbone's collator, plus each sample's (shard, index within the shard) and its own counters.

    The collator counts per batch; a cached run reads the samples in other batches (shuffled, capped by
    ``data.train_batches``, split over ranks), so every record keeps its own share: a batch with anything to
    count is collated once more sample by sample (the counters only; rare: truncations and drops)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        batch = self.collate(samples)
        batch["sources"] = [s["source"] for s in samples]
        zero = {k: 0 for k in SAMPLE_COUNTERS}
        if not any(int(batch["counts"].get(k, 0)) for k in SAMPLE_COUNTERS):
            batch["sample_counts"] = [dict(zero) for _ in samples]
            return batch
        per = [{k: int(self.collate([s])["counts"].get(k, 0)) for k in SAMPLE_COUNTERS} for s in samples]
        for k in SAMPLE_COUNTERS:
            if sum(c[k] for c in per) != int(batch["counts"].get(k, 0)):
                raise RuntimeError(f"collator counter {k}: {int(batch['counts'].get(k, 0))} for the batch of "
                                   f"{batch['keys'][:3]}..., {sum(c[k] for c in per)} summed over its samples alone")
        batch["sample_counts"] = per
        return batch


def _check_values(feats: dict, dtype: str, stage: str, keys: list[str]) -> None:
    """A head input that is not finite, or that the cache's dtype cannot hold (|x| > 65504 in float16 is inf), stops
    the extraction: a prober would train on inf/NaN. One reduction per input where the features are (NaN and inf
    propagate through ``amax``), one transfer for the batch."""
    named = [(h, j, t) for h, v in feats.items() for j, t in enumerate(v) if t.numel()]
    if not named:
        return
    tops = torch.stack([t.detach().abs().amax().float() for _, _, t in named]).tolist()
    limit = float(np.finfo(DTYPES[dtype]).max)
    for (h, j, _), top in zip(named, tops):
        if not np.isfinite(top):
            raise ValueError(f"split {stage}, samples {keys[:3]}...: head {h} input {j} holds non-finite values "
                             f"in the backbone's output (check the backbone and trainer.precision)")
        if top > limit:
            raise ValueError(f"split {stage}, samples {keys[:3]}...: head {h} input {j} holds values up to "
                             f"{top:.6g}, beyond {dtype}'s {limit:.6g} (they would be stored as inf): extract "
                             f"with cache.dtype=float32")


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
                bf16: bool = False, num_workers: int = 0, progress: bool = False) -> tuple[dict, dict]:
    """Extract one split (``progress``: a bar over its samples, rate and ETA); returns its manifest entry and the
    heads' input shapes.

    Loader workers read contiguous parts of the split (any shard count); each mirror shard is written once
    all of its samples have arrived, in the source order, so the cache mirrors the source one to one.
    """
    npdt = DTYPES[dtype]
    urls = dm.urls(stage)
    counts = dict(zip(urls, dm.counts(stage)))
    names = {u: Path(u).name for u in urls}
    loader = dm.loader(stage, train=False, collate=_SourceCollate(dm.collate), num_workers=num_workers)
    pending: dict[str, dict[int, dict]] = {u: {} for u in urls}
    n, shapes = 0, {}

    def flush(url):
        with wds.TarWriter(str(out / names[url]), mtime=0.0, user="value", group="value") as w:
            for i in sorted(pending[url]):
                w.write(pending[url][i])
        pending[url] = None

    for u in urls:
        if counts[u] == 0:
            flush(u)  # a source shard with no samples still gets its (empty) mirror
    bar = progress_bar(total=sum(counts.values()), enabled=progress, unit="sample", desc=f"extract {stage}")
    for batch in loader:
        B = len(batch["keys"])
        bar.update(B)
        dev_batch = move_data_to_device({k: v for k, v in batch.items() if k not in ("sources", "sample_counts")},
                                        device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            feats = module.extract(dev_batch)
        _check_values(feats, dtype, stage, batch["keys"])
        feats = {h: tuple(t.float().cpu().numpy() for t in v) for h, v in feats.items()}
        for h, v in feats.items():
            shapes.setdefault(h, [list(t.shape[1:]) for t in v])
        labels = batch["labels"].cpu().numpy().astype(np.int64)
        rows = _rows_per_sample(module, batch, B)
        for b in range(B):
            url, idx = batch["sources"][b]
            sl = rows[b]
            info = batch["sample_counts"][b]  # the sample's own counters (summed by CacheCollate.counts)
            rec = {"__key__": batch["keys"][b], "labels.npy": _npy(labels[sl]),
                   "info.json": json.dumps({"counts": info}, sort_keys=True).encode()}
            for i, h in enumerate(module.head_names):
                if h in feats:
                    for j, t in enumerate(feats[h]):
                        rec[f"h{i:03d}_{j}.npy"] = _npy(t[sl].astype(npdt))
                elif sl.stop > sl.start:
                    raise RuntimeError(f"extract() returned no input for head {h}")
            pending[url][idx] = rec
            n += 1
            if len(pending[url]) == counts[url]:
                flush(url)
    bar.close()
    left = [names[u] for u in urls if pending[u] is not None]
    if left:
        raise RuntimeError(f"extraction of split {stage} ended with incomplete shard(s) {left[:3]}")
    return {"samples": n, "shards": [names[u] for u in urls], "shard_samples": [counts[u] for u in urls]}, shapes


@honours_switch
def extract_cache(cfg) -> dict:
    """Build backbone + module from ``cfg`` (like ``train``) and write the cache to ``cfg.cache.root``."""
    t0 = time.time()
    check_run(cfg, "extract")  # combinations and value ranges, before any file is read
    cc = cfg.cache
    dtype = str(cc.get("dtype", "float16"))
    if dtype not in DTYPES:
        raise ValueError(f"cache.dtype={dtype!r}: use float16 or float32")
    cfg = OmegaConf.merge(cfg, {"data": {"cache": None}})
    cuda_defaults()
    dm = make_datamodule(cfg)
    module, _ = build_module(cfg, dm)
    device = str(cc.get("device") or "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = run_precision(cfg)  # as the online step would compute the features (bf16 autocast on any device)
    if precision not in ("32", "bf16-mixed"):
        raise ValueError(f"trainer.precision={cfg.trainer.get('precision')}: a feature cache is extracted in 32 or "
                         f"bf16-mixed precision")
    bf16 = precision == "bf16-mixed"
    module.to(device)
    out = Path(cc.root)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    splits, shapes = {}, {}
    stages = list(cc.get("splits") or ["train", "val", "test"])
    for stage in stages:
        split = dm.splits[stage]
        entry, sh = write_split(module, dm, stage, tmp, dtype, device, bf16, int(cfg.data.get("num_workers", 0)),
                                progress=bool(cfg.get("progress", True)))
        entry["pairs"] = dm.manifest["splits"][split].get("pairs", {})
        splits[split] = entry
        shapes.update(sh)
        print(f"[value-pl] cache {split}: {entry['samples']} samples, {len(entry['shards'])} shard(s)")
    missing = [h for h in module.head_names if h not in shapes]
    if missing:
        raise RuntimeError(f"no pair in the extracted splits produced inputs for heads {missing}")
    ident = cache_identity(module, cfg, dtype, precision)
    ident["head_shapes"] = {h: shapes[h] for h in module.head_names}
    man = {k: v for k, v in dm.manifest.items() if k not in ("splits", "inputs")}
    man.update(format=FORMAT, version=VERSION, splits=splits, cache=ident,
               source={"root": str(Path(dm.root).resolve()), "manifest_sha256": sha256_file(Path(dm.root) / "manifest.json")[:16]},
               seconds=round(time.time() - t0, 1))
    (tmp / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"[value-pl] feature cache written to {out} ({dtype}, {len(module.head_names)} head inputs, "
          f"{time.time() - t0:.1f}s)")
    return man
