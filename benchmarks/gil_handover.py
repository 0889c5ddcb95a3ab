"""Does the GIL starve the pin thread while the main thread runs a host-bound step? (CPU proxy)

Real-width shards (36 regions x 2048-d fp16 per image, the demo's captions and vrc pairs), the backbone's collator
in ``--workers`` loader workers, training batches handed over through the workers' reused ring buffers
(``value_pl.data.handover``). A background thread plays the DataLoader's pin thread: one intra-op thread, it
iterates the loader (pipe read + unpickle), "pins" each batch as torch's ``pin_memory()`` walks it (every tensor
copied by a torch call that releases the GIL; a batch packed into its ring buffer copied out in one call into reused
buffers, ``RingBatch.copy_out``; ``--no-pack``: only the features are in the buffer, the other tensors cross by
value and are copied one by one, as before ``data.pack_batches``) and puts it in a bounded ``queue.Queue``. The main
thread takes batches from that queue and runs a GIL-holding step of ``--step-ms`` per batch (0: the loader alone): a
pure-Python loop (``python``), or the same with a tiny torch call every ~25 us (``torch``: each releases the GIL for
a moment, as the ops of a real step do). Each window of ``--batches`` steps runs under one ``sys.setswitchinterval``
(``--intervals``); windows are interleaved over ``--repeats`` rounds. Per step and interval: samples/s (best and
median round), the main thread's share of time waiting for data, the step's own time inside the run (GIL hand-offs
to the pin thread included) and alone (the pin thread idle on a full queue), and what the pin thread delivers while
the main thread runs steps back to back and never waits (``--busy-s``): medians.

    python benchmarks/gil_handover.py --quick        # ~1 min on 2 cores
    python benchmarks/gil_handover.py                # ~6 min: replayed batches of 256, steps 4 / 8 ms
    python benchmarks/gil_handover.py --no-pack      # the same, the batch's other tensors by value
``--replay 0`` decodes for real (then 1-2 workers on 2 cores bound the loader, not the main process).
"""
from __future__ import annotations

import argparse
import json
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import model_config, offline_tokenizer  # noqa: E402

_T = torch.zeros(4)


class Pin:
    """torch's pin_memory() walk over a batch with plain copies (no CUDA here); the features go into one of a few
    reused buffers, as torch's caching host allocator hands pinned memory back."""

    def __init__(self, keep: int):
        self.keep, self.pool = keep, {}

    def _into(self, v: torch.Tensor) -> torch.Tensor:
        size = -(-v.numel() // (1 << 20)) << 20  # blocks rounded up, as the caching host allocator's
        bufs = self.pool.setdefault((size, v.dtype), [])
        if len(bufs) < self.keep:
            bufs.append(torch.zeros(size, dtype=v.dtype))
        bufs.append(bufs.pop(0))
        return bufs[-1][:v.numel()].view_as(v).copy_(v)

    def __call__(self, x):
        from value_pl.data.handover import RingBatch

        if isinstance(x, RingBatch):
            return x.copy_out(self._into)
        if isinstance(x, torch.Tensor):
            return x.clone()
        return {k: self(v) for k, v in x.items()} if isinstance(x, dict) else x


def spin(n: int, every: int) -> None:
    x = 0
    for i in range(n):
        x += i * i
        if i % every == 0:
            _T.add_(1)  # torch kind: releases the GIL for a moment


def calibrate(ms: float, every: int) -> int:
    t = statistics.median(_timed(spin, 100_000, every) for _ in range(7))
    return int(100_000 * ms / 1e3 / t)


def _timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


class Replay(torch.utils.data.IterableDataset):
    """Each worker collates ``n`` real batches once, then hands them over again and again through its ring buffers
    (not rewritten: they hold earlier batches' features): the main process gets what fast workers give it (the GPU
    host's 8 workers: ~26,000 samples/s), and decoding does not take the 2 cores here."""

    def __init__(self, ds, n: int):
        self.ds, self.n, self.kept = ds, n, None

    def __len__(self):
        return len(self.ds)

    def __iter__(self):
        from value_pl.data import handover

        if self.kept is None:  # collated before the ring is on: one-off segments, never handed over
            it = self.ds.samples()
            self.kept = [self.ds.collate([next(it) for _ in range(self.ds.batch_size)]) for _ in range(self.n)]
        handover.activate(self.ds.ring_token, self.ds.ring_buffers, self.ds.pack_batches)
        for i in range(len(self.ds)):
            b = dict(self.kept[i % self.n])
            b["region_feats"] = handover.batch_tensor(tuple(b["region_feats"].shape), b["region_feats"].dtype)
            yield handover.leave(b)  # packed into the ring buffer (unless --no-pack)


def make_loader(root: Path, tok: str, args):
    from value_pl.backbones.uniter import build_uniter
    from value_pl.data.collate import TaskSpec
    from value_pl.data.datamodule import ShardDataModule
    from value_pl.data.stream import no_collate, worker_init

    bb = build_uniter(OmegaConf.create({"pretrained": False, "tokenizer": tok, "seed": 0,
                                        "config": model_config(root.parent, 1, 64, 2)}), img_dim=2048)
    dm = ShardDataModule(root, batch_size=args.batch, num_workers=args.workers, shuffle_buffer=256, pin_memory=False)
    dm.collate = bb.collator(TaskSpec("vrc", "region_region", dm.manifest["labels"]["vrc"]))
    ds = dm.stream("train", True, ring_buffers=args.prefetch + 2,  # as a GPU run's training loader has
                   pack_batches=not args.no_pack)
    return torch.utils.data.DataLoader(Replay(ds, args.replay) if args.replay else ds, batch_size=None,
                                       num_workers=args.workers, collate_fn=no_collate, persistent_workers=True,
                                       prefetch_factor=args.prefetch, worker_init_fn=worker_init)


def pin_thread(loader, q: queue.Queue, stop: threading.Event) -> None:
    torch.set_num_threads(1)  # as torch's pin thread (thread-local)
    pin = Pin(q.maxsize + 2)  # the queue's batches, the one the main thread holds, the one being pinned
    while not stop.is_set():  # epochs back to back (persistent workers)
        for batch in loader:
            if stop.is_set():
                return
            q.put(pin(batch))


def window(q: queue.Queue, n: int, every: int, batches: int, interval: float, busy_s: float) -> dict:
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    while not q.full():  # the pin thread idle (blocked on the full queue): the step alone
        time.sleep(0.05)
    time.sleep(0.2)
    alone = statistics.median(_timed(spin, n, every) for _ in range(10))
    for _ in range(q.maxsize):
        q.get()
        spin(n, every)
    wait = step = 0.0
    samples, t0 = 0, time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        samples += len(q.get()["keys"])
        t1 = time.perf_counter()
        spin(n, every)
        wait, step = wait + t1 - t, step + time.perf_counter() - t1
    dt = time.perf_counter() - t0
    got, t0 = 0, time.perf_counter()
    while n and time.perf_counter() - t0 < busy_s:  # steps back to back, taking only what is ready
        spin(n, every)
        while not q.empty():
            got += len(q.get()["keys"])
    busy = got / (time.perf_counter() - t0) if n else samples / dt
    sys.setswitchinterval(before)
    return {"samples_per_s": samples / dt, "wait_frac": wait / dt, "step_ms": 1e3 * step / batches,
            "alone_ms": 1e3 * alone, "busy_samples_per_s": busy}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--replay", type=int, default=4, help="batches each worker collates and replays (0: decode)")
    ap.add_argument("--step-ms", type=float, nargs="+", default=[4.0, 8.0])
    ap.add_argument("--kinds", nargs="+", default=["python", "torch"], choices=["python", "torch"])
    ap.add_argument("--intervals", type=float, nargs="+", default=[0.005, 0.001, 0.0005, 0.0002])
    ap.add_argument("--batches", type=int, default=60, help="timed steps per window")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--busy-s", type=float, default=1.5, help="seconds of steps back to back per window")
    ap.add_argument("--root", default=None, help="shards to reuse (built there if missing)")
    ap.add_argument("--no-pack", action="store_true",
                    help="data.pack_batches=false: a batch's other tensors cross by value, pinned one by one")
    ap.add_argument("--quick", action="store_true", help="400 images, batch 64, a 4 ms step, 2 rounds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.step_ms, args.batches, args.repeats = 400, 64, [4.0], 30, 2
    tmp = Path(tempfile.mkdtemp(prefix="gil-"))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> int:
    from value_pl.datasets.demo import build_demo

    root = Path(args.root) if args.root else tmp / "shards"
    if not (root / "manifest.json").exists():
        build_demo(root, splits={"train": args.images, "val": 8, "test": 8}, num_regions=36, feature_dim=2048)
    every = max(1, int(25e-6 * calibrate(1e3, 10**9)))  # pure-loop iterations in ~25 us
    steps = [("loader alone", 0, 1)] + [(f"{ms:g} ms {k}", ms, every if k == "torch" else 10**9)
                                        for ms in args.step_ms for k in args.kinds]
    steps = [(name, calibrate(ms, every) if ms else 0, every) for name, ms, every in steps]  # before the workers
    loader = make_loader(root, offline_tokenizer(tmp / "tok"), args)
    q: queue.Queue = queue.Queue(maxsize=args.prefetch * args.workers)
    stop = threading.Event()
    th = threading.Thread(target=pin_thread, args=(loader, q, stop), daemon=True)
    th.start()
    res: dict = {}
    for r in range(args.repeats):
        for name, n, every in steps:
            for iv in args.intervals[r % len(args.intervals):] + args.intervals[:r % len(args.intervals)]:
                row = window(q, n, every, args.batches, iv, args.busy_s)
                res.setdefault((name, iv), []).append(row)
                print(f"# round {r}, step {name}, interval {1e3 * iv:g} ms: "
                      + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    stop.set()
    while th.is_alive():  # the pin thread leaves the loader before the ring's buffers are forgotten
        try:
            q.get(timeout=0.1)
        except queue.Empty:
            pass
    print(f"\n[{args.images} images, batch {args.batch}, {args.workers} worker(s), {args.repeats} rounds"
          f"{f', {args.replay} batches replayed per worker' if args.replay else ', decoded'}]\n| step | switch "
          "interval ms | samples/s best / median | waiting for data | step ms in run | step ms alone | pin thread "
          "samples/s, steps back to back |\n|---|" + "---:|" * 6)
    out = []
    for (name, iv), rows in res.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        best = max(r["samples_per_s"] for r in rows)
        print(f"| {name} | {1e3 * iv:g} | {best:,.0f} / {med['samples_per_s']:,.0f} | {100 * med['wait_frac']:.0f}% "
              f"| {med['step_ms']:.2f} | {med['alone_ms']:.2f} | {med['busy_samples_per_s']:,.0f} |")
        out.append({"step": name, "interval_s": iv, "samples_per_s_best": best, **{f"median_{k}": v for k, v in
                                                                                   med.items()}})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
