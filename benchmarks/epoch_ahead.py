"""What an epoch waits for its data, with and without starting the next epoch ahead (``data.epoch_ahead``).

The training loader over real-width shards (36 regions x 2048-d fp16 per image, ~12-word captions, 6 vrc pairs;
the backbone's collator, in ``--workers`` loader workers) feeds a consumer that stands in for a GPU: each step
takes ``--step-ms`` and a validation run of ``--val-ms`` follows every epoch (both slept, so the loader has the
CPU to itself, as on a GPU machine). Per mode, for the epochs after the first (the first includes worker start-up):
the wait for an epoch's first batch, the wait for all its batches, and samples/s over the epoch (wall clock).

    python benchmarks/epoch_ahead.py                     # ~1 min on 2 cores
    python benchmarks/epoch_ahead.py --workers 4 --batch 256 --train-images 8000
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


def run(root: Path, collate, args, ahead: bool) -> list[dict]:
    from value_pl.data.datamodule import ShardDataModule

    dm = ShardDataModule(root, batch_size=args.batch, num_workers=args.workers, seed=0,
                         prefetch_factor=args.prefetch, epoch_ahead=ahead)
    dm.collate = collate
    loader = dm.train_dataloader()
    out = []
    for _ in range(args.epochs):
        waits, samples = [], 0
        t0 = t_end = time.perf_counter()
        for batch in loader:
            waits.append(time.perf_counter() - t_end)
            samples += len(batch["keys"])
            time.sleep(args.step_ms / 1e3)
            t_end = time.perf_counter()
        wall = t_end - t0
        out.append({"first_wait_s": waits[0], "wait_s": sum(waits), "wall_s": wall, "samples_per_s": samples / wall})
        time.sleep(args.val_ms / 1e3)  # validation
    del loader
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--step-ms", type=float, default=40.0, help="the consumer's time per batch (a GPU step)")
    ap.add_argument("--val-ms", type=float, default=500.0, help="time between epochs (a validation run)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2, help="runs per mode, interleaved")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from value_pl.backbones.uniter import build_uniter
    from value_pl.data.collate import TaskSpec
    from value_pl.datasets.demo import build_demo

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        tok = offline_tokenizer(tmp / "tokenizer")
        bb = build_uniter(OmegaConf.create({"pretrained": False, "tokenizer": tok, "seed": 0,
                                            "config": model_config(tmp, 2, 64, 4)}), img_dim=2048)
        man = build_demo(tmp / "shards", splits={"train": args.train_images, "val": 16, "test": 16},
                         num_regions=36, feature_dim=2048, maxcount=1000)
        collate = bb.collator(TaskSpec("vrc", "region_region", man["labels"]["vrc"]))
        res = {False: [], True: []}
        for _ in range(args.reps):
            for ahead in (False, True):
                res[ahead] += run(tmp / "shards", collate, args, ahead)[1:]  # epochs after the first
    print(f"# {args.train_images} images x 36 x 2048-d fp16, batch {args.batch}, {args.workers} worker(s), "
          f"prefetch {args.prefetch}, step {args.step_ms:g} ms, validation {args.val_ms:g} ms; median of "
          f"{len(res[True])} epochs per mode (the first epoch of each run left out)")
    print("\n| training loader | first batch of an epoch: wait | all batches: wait | epoch wall | samples/s |")
    print("|---|---:|---:|---:|---:|")
    for ahead, name in ((False, "plain (next epoch starts at iter())"), (True, "epoch_ahead (default)")):
        med = {k: statistics.median(e[k] for e in res[ahead]) for k in res[ahead][0]}
        print(f"| {name} | {1e3 * med['first_wait_s']:.0f} ms | {1e3 * med['wait_s']:.0f} ms | "
              f"{med['wall_s']:.2f} s | {med['samples_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
