"""What starting a loader's workers costs the main process: forked, or from a forkserver (``data.worker_start``).

A GPU training process holds GiBs (the CUDA libraries and context, the backbone, pinned buffers); the validation
loader's workers start in the middle of training. This stands in for that process with ``--ballast`` GiB of touched
tensor memory and, per start method and ballast, times in the main thread (median of ``--reps`` starts):

* **start**: ``iter(loader)``, which starts ``--workers`` workers on the validation split (the real width: 36
  regions x 2048-d fp16 per image, ~12-word captions, 6 vrc pairs; the backbone's collator and the MiniLM
  tokenizer, or a synthetic one without its package);
* **write after**: writing every page of the ballast once while those workers live, against the same write with no
  worker alive (**write alone**). A forked worker shares the main process's pages copy-on-write: each page the main
  process writes afterwards is copied first. A forkserver worker shares none;
* **first batch**: from the start to the first batch received.

The first forkserver start of a process also waits for the server to import the loader's code (reported once).

    python benchmarks/worker_start.py                  # ~2 min on 2 cores
    python benchmarks/worker_start.py --ballast 0 4 8 --workers 4
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import model_config, offline_tokenizer  # noqa: E402


def write_all(t: torch.Tensor) -> float:
    """Seconds to write every page of ``t`` once (one float per 4 KiB page: what copy-on-write charges for)."""
    view = t.view(-1)[:: 1024]
    c = time.perf_counter()
    view.add_(1)
    return time.perf_counter() - c


def one_start(dm, method: str, ballast: torch.Tensor | None) -> dict:
    dm.worker_start = method
    loader = dm.loader("val", False)
    alone = write_all(ballast) if ballast is not None else 0.0
    t = time.perf_counter()
    it = iter(loader)
    start = time.perf_counter() - t
    after = write_all(ballast) if ballast is not None else 0.0
    next(it)
    first = time.perf_counter() - t
    for _ in it:
        pass
    it._shutdown_workers()
    return {"start_ms": 1e3 * start, "write_alone_ms": 1e3 * alone, "write_after_ms": 1e3 * after,
            "first_batch_ms": 1e3 * first}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ballast", type=float, nargs="+", default=[0, 2, 4], help="GiB of touched memory in the main "
                    "process (default: 0 2 4)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=512, help="validation images (default 512)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from value_pl.backbones.uniter import build_uniter
    from value_pl.data.collate import TaskSpec
    from value_pl.data.datamodule import ShardDataModule
    from value_pl.datasets.demo import build_demo

    tmp = Path(tempfile.mkdtemp(prefix="worker_start_"))
    try:  # a real WordPiece tokenizer (what a worker receives with a real backbone: ~0.9 MB pickled)
        from value_pl.backbones.common import minilm_path

        tok = minilm_path()
    except ImportError:  # a GPU image: a synthetic one, far smaller pickled
        tok = offline_tokenizer(tmp / "tokenizer")
    bb = build_uniter(OmegaConf.create({"pretrained": False, "tokenizer": tok, "seed": 0,
                                        "config": model_config(tmp, 2, 64, 4)}), img_dim=2048)
    root = tmp / "shards"
    man = build_demo(root, splits={"train": 16, "val": args.images, "test": 16}, num_regions=36, feature_dim=2048,
                     maxcount=max(16, args.images // args.workers))
    dm = ShardDataModule(root, batch_size=args.batch, num_workers=args.workers, pin_memory=False)
    dm.collate = bb.collator(TaskSpec("vrc", "region_region", man["labels"]["vrc"]))

    sent = len(pickle.dumps(dm.stream("val", False)))
    print(f"# the dataset a worker started from a server receives: {sent / 1e6:.2f} MB pickled", flush=True)
    t = time.perf_counter()
    first = one_start(dm, "forkserver", None)  # the server starts and imports the loader's code
    server_ms = 1e3 * (time.perf_counter() - t)
    print(f"# first forkserver start of this process (the server imports the loader's code): start "
          f"{first['start_ms']:.0f} ms, first batch {first['first_batch_ms']:.0f} ms", flush=True)
    rows = []
    for gib in args.ballast:
        ballast = torch.ones(int(gib * 2**30) // 4) if gib else None
        for method in ("fork", "forkserver"):
            runs = [one_start(dm, method, ballast) for _ in range(args.reps)]
            row = {"method": method, "ballast_gib": gib, "workers": args.workers,
                   **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
            rows.append(row)
            print(f"{method:>10} | ballast {gib:g} GiB | start {row['start_ms']:7.1f} ms | write alone "
                  f"{row['write_alone_ms']:7.1f} ms | write after {row['write_after_ms']:7.1f} ms | first batch "
                  f"{row['first_batch_ms']:7.1f} ms", flush=True)
        del ballast
    if args.json:
        args.json.write_text(json.dumps({"server_first_start_ms": server_ms, "first": first, "dataset_bytes": sent,
                                         "rows": rows},
                                        indent=1))
    return rows


if __name__ == "__main__":
    main()
