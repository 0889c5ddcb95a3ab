"""The SentEval grid, batched vs SentEval's loop: ``python benchmarks/senteval_grid.py [--quick] [--real]``.

1. **Synthetic, SentEval-sized** (default 10,000 sentences = 8,000 / 1,000 / 1,000, 7 layers x 384-d, 6 classes,
   a learnable label): the 36-configuration grid (nhid {50,100,200} x dropout {0,0.1,0.2} x L2 {1e-5..1e-2}, Adam
   lr 1e-3, batch 64, epoch_size 4, tenacity 5, max_epoch 200) of every layer, once with
   :func:`value_pl.protocols.senteval.probe_layers` (all layers and configurations at once) and once with
   :func:`value_pl.protocols.senteval.probe_layer` (SentEval's loop, one configuration at a time), on the same
   cached features, in one process with the same torch threads. The batched run is repeated (``--repeats``,
   min reported, interleaved with the sequential run); the sequential loop runs on ``--seq-layers`` (default
   layers 0 and 6; ``all`` for every layer) and its time is extrapolated to all layers otherwise (per-layer
   mean x layers; said in the output). Printed: seconds (wall and process CPU time) each, speed-up, selected
   configuration and test accuracy per layer for both, max |diff|.
2. ``--real``: the whole SentLen protocol end to end (``python -m value_pl.train task=sentlen
   prober=senteval_mlp backbone=minilm_uniter``: MiniLM load, feature extraction, the grid) on SentEval-format
   shards of ~2,600 generated captions (5-28 words, SentEval's 6 length bins, tr/va/te 80/10/10), built with
   ``python -m value_pl.datasets.build dataset=senteval``: wall time of the command and results.json's timing.
   ``--real-seq`` adds the batched grid vs the sequential loop on the same SentLen features.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from value_pl.protocols.senteval import grid_of, probe_layer, probe_layers  # noqa: E402

OPTS = {"lr": 1e-3, "batch_size": 64, "tenacity": 5, "epoch_size": 4, "max_epoch": 200}


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def synthetic(n: int, layers: int, dim: int, classes: int, seed: int = 0):
    """Labels from a 16-d latent (argmax of a noisy linear score); each layer: a nonlinear random projection of
    the latent to ``dim`` dims, with its own signal strength, plus noise and an offset."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, classes, generator=g)
    z = torch.randn(n, 16, generator=g)
    y = (z @ a + torch.randn(n, classes, generator=g)).argmax(1)
    xs = []
    for li in range(layers):
        p = torch.randn(16, dim, generator=g) / 4
        snr = 0.3 + 0.7 * (1 - abs(li - layers * 0.6) / layers)
        noise = 0.6 * torch.randn(n, dim, generator=g) + 0.3 * torch.randn(dim, generator=g)
        xs.append(torch.tanh(z @ p) * snr + noise)
    a_, b_ = int(0.8 * n), int(0.9 * n)
    return ([x[:a_] for x in xs], y[:a_]), ([x[a_:b_] for x in xs], y[a_:b_]), ([x[b_:] for x in xs], y[b_:])


def cfg_str(r: dict) -> str:
    return f"{r['nhid']}/{r['dropout']}/{r['l2']:g}"


def bench_synthetic(args) -> None:
    tr, va, te = synthetic(args.n, args.layers, args.dim, args.classes)
    grid = grid_of({"name": "senteval_mlp"}, {})
    keys = [f"sent:layer_{li:02d}" for li in range(args.layers)]
    seq_layers = list(range(args.layers)) if args.seq_layers == "all" else [int(s) for s in args.seq_layers.split(",")]
    print(f"synthetic task: {len(tr[1])}/{len(va[1])}/{len(te[1])} sentences x {args.layers} layers x {args.dim}-d, "
          f"{args.classes} classes; grid {len(grid)} configurations per layer; {OPTS}")
    batched, times, cpus = None, [], []
    seq, t_seq, c_seq = {}, 0.0, 0.0
    for rep in range(args.repeats):
        print(f"[batched run {rep + 1}/{args.repeats}] load {load()}", flush=True)
        t, c = time.perf_counter(), time.process_time()
        batched = probe_layers(tr, va, te, args.classes, grid, OPTS, 1111, keys, args.device)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        print(f"  {times[-1]:.1f} s wall, {cpus[-1]:.1f} s CPU", flush=True)
        if rep == 0 and not args.no_seq:
            print(f"[sequential loop on layers {seq_layers}] load {load()}", flush=True)
            t, c = time.perf_counter(), time.process_time()
            for li in seq_layers:
                seq[li] = probe_layer(tr[0][li], tr[1], va[0][li], va[1], te[0][li], te[1], args.classes,
                                      grid[:args.seq_configs], OPTS, 1111, keys[li], args.device)
                print(f"  layer {li}: {time.perf_counter() - t:.1f} s so far", flush=True)
            t_seq, c_seq = time.perf_counter() - t, time.process_time() - c
    t_bat = min(times)
    part = args.seq_configs < len(grid)
    if part:  # a subset of the grid: time only (its selection is not the protocol's)
        print(f"sequential loop ran {args.seq_configs} of {len(grid)} configurations per layer: its time is "
              f"EXTRAPOLATED x{len(grid) / args.seq_configs:.1f}; no accuracy comparison")
        t_seq *= len(grid) / args.seq_configs
        c_seq *= len(grid) / args.seq_configs
        seq = {li: None for li in seq}
    print(f"\nload average at the end: {load()}")
    print("\n| layer | batched: config (nhid/dropout/l2) | batched test acc | sequential: config | sequential test acc "
          "| abs diff (points) |\n|---:|---|---:|---|---:|---:|")
    diffs = []
    for li, b in enumerate(batched):
        s = seq.get(li)
        d = abs(100 * (b["test_acc"] - s["test_acc"])) if s else None
        if d is not None:
            diffs.append(d)
        s_cfg = cfg_str(s) if s else "-"
        s_acc = f"{100 * s['test_acc']:.2f}" if s else "-"
        print(f"| {li} | {cfg_str(b)} | {100 * b['test_acc']:.2f} | {s_cfg} | {s_acc} | "
              f"{f'{d:.2f}' if d is not None else '-'} |")
    if seq:
        full = len(seq) == args.layers
        t_seq_all = t_seq / len(seq) * args.layers
        print(f"\nbatched (all {args.layers} layers x {len(grid)} configs): {t_bat:.1f} s "
              f"(min of {len(times)}: {', '.join(f'{t:.1f}' for t in times)})")
        print(f"sequential loop: {t_seq:.1f} s for {len(seq)} layer(s)"
              + ("" if full else f" -> {t_seq_all:.1f} s for {args.layers} layers (EXTRAPOLATED: per-layer mean x "
                                 f"{args.layers})"))
        c_bat, c_seq_all = min(cpus), c_seq / len(seq) * args.layers
        print(f"CPU time (process_time, all threads): batched {c_bat:.1f} s (min), sequential {c_seq_all:.1f} s"
              f"{'' if full else ' (extrapolated)'}")
        print(f"speed-up: {t_seq_all / t_bat:.1f}x wall, {c_seq_all / c_bat:.1f}x CPU time")
        if not part:
            print(f"selected test accuracy, max abs difference over layers {sorted(seq)}: {max(diffs):.2f} points")
            same = sum(cfg_str(batched[li]) == cfg_str(s) for li, s in seq.items())
            print(f"same selected configuration on {same}/{len(seq)} layer(s)")


SUBJ = ["a man", "a woman", "two children", "the old dog", "a young girl", "three men", "a boy", "a chef",
        "the cyclist", "a group of people", "an elderly couple", "a small brown dog", "the musician"]
VERB = ["rides a bike", "walks", "holds an umbrella", "plays guitar", "reads a newspaper", "runs", "sits",
        "cooks dinner", "throws a ball", "waits for the bus", "talks on the phone", "climbs a rock"]
MODS = ["on the street", "in the park", "near the river", "with a friend", "in the rain", "at night",
        "next to a red car", "in front of the old church", "under a large tree", "on a sunny day",
        "while smiling", "in a crowded market", "beside the lake", "after work", "with his dog",
        "in a blue shirt", "on the beach", "at the station"]
BINS = [(5, 8), (9, 12), (13, 16), (17, 20), (21, 25), (26, 28)]  # SentEval's sentence_length classes


def captions(n: int, seed: int = 0) -> list[tuple[int, str]]:
    """(label, caption) pairs, every length bin equally often; words = the caption split on spaces."""
    import random

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        label = len(out) % len(BINS)
        lo, hi = BINS[label]
        target = rng.randint(lo, hi)
        words = f"{rng.choice(SUBJ)} {rng.choice(VERB)}".split()
        mods = rng.sample(MODS, len(MODS))
        while len(words) + 1 < target and mods:
            m = mods.pop().split()
            if len(words) + len(m) + 1 <= target:
                words += m
        while len(words) + 1 < target:
            words.append(rng.choice(["today", "again", "slowly", "too", "alone", "happily"]))
        words.append(".")
        if lo <= len(words) <= hi:
            out.append((label, " ".join(words)))
    return out


def bench_real(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="senteval_real_"))
    rows = captions(args.real_sentences)
    import random

    random.Random(1).shuffle(rows)
    split = ["tr"] * 8 + ["va", "te"]
    (tmp / "probing").mkdir()
    (tmp / "probing" / "sentence_length.txt").write_text(
        "".join(f"{split[i % 10]}\t{lab}\t{c}\n" for i, (lab, c) in enumerate(rows)))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    build = [sys.executable, "-m", "value_pl.datasets.build", "dataset=senteval", f"dataset.dir={tmp / 'probing'}",
             "dataset.tasks=[sentlen]", f"out={tmp / 'shards'}", "progress=false"]
    subprocess.run(build, check=True, cwd=REPO, env=env, capture_output=True)
    run = tmp / "run"
    cmd = [sys.executable, "-m", "value_pl.train", "task=sentlen", "prober=senteval_mlp", "backbone=minilm_uniter",
           "backbone.path=minilm", f"data.root={tmp / 'shards' / 'sentlen'}", "logger=none", "progress=false",
           f"run_dir={run}", f"hydra.run.dir={run}"]
    print(f"\nreal-data target: SentLen, {len(rows)} generated captions (SentEval format), MiniLM-UNITER, "
          f"7 layers x 36 configurations; load {load()}", flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        print(p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit("the SentLen run failed")
    res = json.loads((run / "results.json").read_text())
    print(f"whole protocol (python -m value_pl.train, incl. start-up and model load): {wall:.1f} s wall; "
          f"results.json timing: features {res['timing']['extract_s']} s, grid {res['timing']['probe_s']} s; "
          f"load at the end {load()}")
    print("| layer | config (nhid/dropout/l2) | dev acc | test acc | passes |\n|---:|---|---:|---:|---:|")
    for r in res["layers"]:
        print(f"| {r['layer']} | {cfg_str(r)} | {100 * r['val_acc']:.2f} | {100 * r['test_acc']:.2f} | {r['passes']} |")
    if args.real_seq:
        real_vs_sequential(tmp / "shards" / "sentlen")


def real_features(root: Path):
    """The SentLen features of the MiniLM-UNITER layers, extracted in this process as the driver does."""
    from hydra import compose, initialize_config_dir

    from value_pl import CONFIG_DIR
    from value_pl.driver.setup import prepare
    from value_pl.protocols.fitting import extract_split

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name="train", overrides=[
            "task=sentlen", "prober=senteval_mlp", "backbone=minilm_uniter", "backbone.path=minilm",
            f"data.root={root}", "logger=none", "progress=false", f"run_dir={root.parent / 'run_features'}"])
    _, dm, module, spec = prepare(cfg)
    keys = list(module.head_names)
    out = {}
    for stage in ("train", "val", "test"):
        f, y, _ = extract_split(module, dm, stage)
        out[stage] = ([f[k][0] for k in keys], y)
    return out, keys, len(spec.labels)


def real_vs_sequential(root: Path) -> None:
    (tr, va, te), keys, C = (lambda o: ((o[0]["train"], o[0]["val"], o[0]["test"]), o[1], o[2]))(real_features(root))
    grid = grid_of({"name": "senteval_mlp"}, {})
    print(f"\nsame SentLen features ({len(tr[1])}/{len(va[1])}/{len(te[1])}, {len(keys)} layers): batched grid vs "
          f"the sequential loop, load {load()}", flush=True)
    t = time.perf_counter()
    bat = probe_layers(tr, va, te, C, grid, OPTS, 1111, keys)
    t_bat = time.perf_counter() - t
    print(f"  batched: {t_bat:.1f} s; load {load()}", flush=True)
    t = time.perf_counter()
    seq = [probe_layer(tr[0][i], tr[1], va[0][i], va[1], te[0][i], te[1], C, grid, OPTS, 1111, k)
           for i, k in enumerate(keys)]
    t_seq = time.perf_counter() - t
    print(f"  sequential: {t_seq:.1f} s; speed-up {t_seq / t_bat:.1f}x; load {load()}")
    print("| layer | batched config | batched test | sequential config | sequential test | abs diff (points) |\n"
          "|---:|---|---:|---|---:|---:|")
    for i, (b, q) in enumerate(zip(bat, seq)):
        print(f"| {i} | {cfg_str(b)} | {100 * b['test_acc']:.2f} | {cfg_str(q)} | {100 * q['test_acc']:.2f} | "
              f"{abs(100 * (b['test_acc'] - q['test_acc'])):.2f} |")
    print(f"max abs difference: {max(abs(100 * (b['test_acc'] - q['test_acc'])) for b, q in zip(bat, seq)):.2f} points")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="sentences (80/10/10 train/dev/test)")
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--seq-layers", default="0,6", help="layers the sequential loop runs on ('all' = every layer)")
    ap.add_argument("--seq-configs", type=int, default=36, help="configurations per layer the sequential loop runs "
                    "(fewer: time extrapolated, no accuracy comparison)")
    ap.add_argument("--no-seq", action="store_true", help="skip the sequential loop")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (features and classifiers on that device)")
    ap.add_argument("--repeats", type=int, default=2, help="batched runs (min reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="4,000 sentences x 3 layers, sequential on layer 0")
    ap.add_argument("--real", action="store_true", help="also the whole SentLen protocol on generated captions")
    ap.add_argument("--real-only", action="store_true")
    ap.add_argument("--real-sentences", type=int, default=2630)
    ap.add_argument("--real-seq", action="store_true", help="with --real: also the batched grid vs the sequential "
                    "loop on the same SentLen features (the sequential loop takes ~15-25 min on 2 cores)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.layers, args.seq_layers, args.repeats = 4000, 3, "0", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the sequential loop's dropout masks come from the global generator
    gpu = f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"machine: {os.cpu_count()} logical CPU(s){gpu}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), device {args.device}, load average {load()} (shared machine: other jobs may be running)")
    if not args.real_only:
        bench_synthetic(args)
    if args.real or args.real_only:
        bench_real(args)


if __name__ == "__main__":
    main()
