"""Shards mapped or read (``ShardStream.mapped``): what one loader worker makes, and how long an epoch's first batch
takes it.

Real-width shards (36 regions x 2048-d fp16 per image, ~12-word captions, 6 vrc pairs; the backbone's collator),
one loader worker (a process of its own, as in training: its garbage collector set by ``worker_init``, its batches
handed over through reused buffers, ``ring_buffers``) and the main process taking the batches. Per mode, in
interleaved runs: samples/s over each epoch after its first batch, and the wait for that first batch: the worker
fills its shuffle buffer (``--shuffle-buffer`` samples, undecoded) and decodes and collates one batch, which is what
every epoch's start waits for unless it was made ahead (``data.read_ahead``). ``read``: each tar member's bytes
read from the file (``bytes``); ``mapped``: views of the mapped file (the default: nothing copied until the
collator copies a sample's features into its batch).

    python benchmarks/shard_read.py                  # ~1 min on 2 cores
    python benchmarks/shard_read.py --images 4000 --batch 256 --shuffle-buffer 1000 --reps 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import model_config, offline_tokenizer  # noqa: E402


def epochs(dm, collate, mapped: bool, n: int) -> list[tuple[float, float]]:
    """(first batch wait, samples/s after it) of ``n`` epochs of one persistent worker."""
    from value_pl.data.stream import no_collate, worker_init

    ds = dm.stream("train", True, collate=collate, ring_buffers=6)
    ds.mapped = mapped
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, collate_fn=no_collate,
                                     persistent_workers=True, prefetch_factor=4, worker_init_fn=worker_init)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        it = iter(dl)
        next(it)
        t1 = time.perf_counter()
        k = sum(len(b["keys"]) for b in it)
        out.append((t1 - t0, k / (time.perf_counter() - t1)))  # (printed per run: first batch / samples/s)
    return out[1:]  # the first epoch includes the worker's start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4, help="per run (the first is left out)")
    ap.add_argument("--reps", type=int, default=2, help="runs per mode, interleaved")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from value_pl.backbones.uniter import build_uniter
    from value_pl.data.collate import TaskSpec
    from value_pl.data.datamodule import ShardDataModule
    from value_pl.datasets.demo import build_demo

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        tok = offline_tokenizer(tmp / "tokenizer")
        bb = build_uniter(OmegaConf.create({"pretrained": False, "tokenizer": tok, "seed": 0,
                                            "config": model_config(tmp, 2, 64, 4)}), img_dim=2048)
        man = build_demo(tmp / "shards", splits={"train": args.images, "val": 16, "test": 16}, num_regions=36,
                         feature_dim=2048, maxcount=1000)
        collate = bb.collator(TaskSpec("vrc", "region_region", man["labels"]["vrc"]))
        dm = ShardDataModule(tmp / "shards", batch_size=args.batch, shuffle_buffer=args.shuffle_buffer, seed=0)
        res = {"read": [], "mapped": []}
        for _ in range(args.reps):
            for mode in res:
                eps = epochs(dm, collate, mode == "mapped", args.epochs)
                print(f"# {mode}: " + ", ".join(f"{1e3 * w:.0f} ms / {r:,.0f}" for w, r in eps), flush=True)
                res[mode] += eps
    print(f"# {args.images} training images x 36 x 2048-d fp16, batch {args.batch}, shuffle buffer "
          f"{args.shuffle_buffer}, one loader worker; median of {len(res['read'])} epochs per mode (each run's first "
          f"left out)\n")
    print("| shards | an epoch's first batch | samples/s after it |\n|---|---:|---:|")
    for mode, eps in res.items():
        print(f"| {mode} | {1e3 * statistics.median(e[0] for e in eps):.0f} ms | "
              f"{statistics.median(e[1] for e in eps):,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
