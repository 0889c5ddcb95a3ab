"""What epochs and validation runs wait for their data, with and without starting them ahead (``data.epoch_ahead``)
and with and without each worker reading its next epoch's first batch ahead (``data.read_ahead``).

``Trainer.fit`` over real-width shards (36 regions x 2048-d fp16 per image, ~12-word captions, 6 vrc pairs; the
backbone's collator in ``--workers`` loader workers per loader) with a module that stands in for a GPU: each
training step takes ``--step-ms`` and each validation step ``--val-step-ms`` (slept, so the workers have the CPU
to themselves, as on a GPU machine). Per mode, over the epochs after the first (which includes worker start-up):
the wait for a training epoch's first batch, the wait for all its batches, the wait for a validation run's first
batch, and samples/s over the whole cycle of a training epoch and its validation run (wall clock). Modes
(``--modes``): ``plain`` (both off), ``ahead`` (``data.epoch_ahead=true``, ``data.read_ahead=false``) and ``read``
(both on: the default on a GPU). ``--val-every N`` validates every N epochs (a number above ``--epochs``: once, after
the last, as ``benchmarks/gpu.py`` does: epochs back to back).

    python benchmarks/epoch_ahead.py                     # ~1.5 min on 2 cores
    python benchmarks/epoch_ahead.py --val-every 100 --epochs 8 --reps 3   # back to back
    python benchmarks/epoch_ahead.py --workers 4 --batch 256 --train-images 8000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import model_config, offline_tokenizer  # noqa: E402


class Sleeper(pl.LightningModule):
    """Consumes batches like a GPU step that takes a fixed time, and times the waits for data."""

    def __init__(self, step_s: float, val_step_s: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.step_s, self.val_step_s = step_s, val_step_s
        self.epochs: list[dict] = []

    def on_train_epoch_start(self):
        self.rec = {"t0": time.perf_counter(), "wait_s": 0.0, "samples": 0}
        self.t_end = self.rec["t0"]

    def on_train_batch_start(self, batch, batch_idx):
        w = time.perf_counter() - self.t_end
        self.rec["wait_s"] += w
        if batch_idx == 0:
            self.rec["first_wait_s"] = w
        self.rec["samples"] += len(batch["keys"])

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_s)
        return (self.w ** 2).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.t_end = time.perf_counter()

    def on_validation_epoch_start(self):
        self.v0 = time.perf_counter()

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.rec["val_first_wait_s"] = time.perf_counter() - self.v0

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_step_s)

    def on_train_epoch_end(self):  # after the epoch's validation run
        self.rec.setdefault("val_first_wait_s", float("nan"))  # (no validation run after this epoch)
        self.rec["cycle_s"] = time.perf_counter() - self.rec.pop("t0")
        self.rec["samples_per_s"] = self.rec["samples"] / self.rec["cycle_s"]
        self.epochs.append(self.rec)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


MODES = {"plain": (False, False), "ahead": (True, False), "read": (True, True)}  # (epoch_ahead, read_ahead)
NAMES = {"plain": "plain (an epoch starts at `iter()`)", "ahead": "`data.epoch_ahead=true`, `data.read_ahead=false`",
         "read": "both on (the default on a GPU)"}


def run(root: Path, collate, args, mode: str, tmp: Path) -> list[dict]:
    from value_pl.data.datamodule import ShardDataModule

    ahead, read = MODES[mode]
    dm = ShardDataModule(root, batch_size=args.batch, eval_batch_size=2 * args.batch, num_workers=args.workers,
                         seed=0, prefetch_factor=args.prefetch, epoch_ahead=ahead, read_ahead=read)
    dm.collate = collate
    m = Sleeper(args.step_ms / 1e3, args.val_step_ms / 1e3)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp), check_val_every_n_epoch=args.val_every)
    trainer.fit(m, datamodule=dm)
    return m.epochs[1:]  # the first includes worker start-up


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-images", type=int, default=2048)
    ap.add_argument("--val-images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--step-ms", type=float, default=40.0, help="a training step's time (a GPU step)")
    ap.add_argument("--val-step-ms", type=float, default=20.0, help="a validation step's time")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2, help="runs per mode, interleaved")
    ap.add_argument("--val-every", type=int, default=1, help="validate every N epochs (above --epochs: after the last)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import warnings

    from value_pl.backbones.uniter import build_uniter
    from value_pl.data.collate import TaskSpec
    from value_pl.datasets.demo import build_demo

    warnings.filterwarnings("ignore", module="pytorch_lightning")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        tok = offline_tokenizer(tmp / "tokenizer")
        bb = build_uniter(OmegaConf.create({"pretrained": False, "tokenizer": tok, "seed": 0,
                                            "config": model_config(tmp, 2, 64, 4)}), img_dim=2048)
        man = build_demo(tmp / "shards", splits={"train": args.train_images, "val": args.val_images, "test": 16},
                         num_regions=36, feature_dim=2048, maxcount=1000)
        collate = bb.collator(TaskSpec("vrc", "region_region", man["labels"]["vrc"]))
        res = {m: [] for m in args.modes}
        for _ in range(args.reps):
            for mode in args.modes:
                res[mode] += run(tmp / "shards", collate, args, mode, tmp)
    print(f"# {args.train_images} training / {args.val_images} validation images x 36 x 2048-d fp16, batch "
          f"{args.batch} (validation {2 * args.batch}), {args.workers} worker(s) per loader, prefetch {args.prefetch}, "
          f"step {args.step_ms:g} ms, validation step {args.val_step_ms:g} ms, validation every {args.val_every} "
          f"epoch(s); median of {len(res[args.modes[0]])} epochs per mode (the first epoch of each run left out)")
    print("\n| loaders | training epoch: first batch wait | all batches wait | validation run: first batch wait "
          "| epoch + validation | samples/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        name = NAMES[mode]
        med = {k: statistics.median(e[k] for e in res[mode]) for k in res[mode][0]}
        val = med["val_first_wait_s"]
        val = "-" if val != val else f"{1e3 * val:.0f} ms"  # (nan: no validation run after those epochs)
        print(f"| {name} | {1e3 * med['first_wait_s']:.0f} ms | {1e3 * med['wait_s']:.0f} ms | {val} | "
              f"{med['cycle_s']:.2f} s | {med['samples_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
