"""What the host issues per frozen forward, plain vs replayed from a CUDA graph (CPU-runnable).

On a GPU a probe step costs what its host side costs (docs/performance.md): every operator is a kernel launch.
This counts the operators the host dispatches per frozen forward of a 12-layer UNITER (random weights, bf16
autocast, the captures of the ``layer_emb`` and ``attention`` probers and the bare forward), plain and through
:class:`value_pl.backbones.graphs.GraphedForward` -- there with the graph's replay stubbed out, since a CPU has no
graphs: what is left is what the host does besides the one graph launch (refilling the static inputs). The
operators do not depend on the width; the default width (64) and batch (2) keep the CPU's compute small, so the
host time per call is mostly per-operator overhead (at 768 wide the CPU's arithmetic would dominate it).

    python benchmarks/graphs_host.py            # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu import model_config, offline_tokenizer, synthetic_batch  # noqa: E402


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class NoReplay:
    """Records nothing and replays nothing: the host's own work around a graph launch."""

    def capture(self, fn, device=None):
        return fn(), lambda: None


def per_call(fn, iters: int) -> float:
    fn()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from value_pl.backbones.capture import CaptureSpec
    from value_pl.backbones.graphs import GraphedForward
    from value_pl.backbones.uniter import build_uniter
    from value_pl.probers.module import ProbeModule

    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        tok = offline_tokenizer(tmp / "tok")
        bb = build_uniter(OmegaConf.create({"pretrained": False, "tokenizer": tok, "seed": 0,
                                            "config": model_config(tmp, args.layers, args.hidden, args.heads)}),
                          img_dim=2048)
        # 21 text tokens: padded to 24, as most batches are (the fills are part of the host work)
        batch = synthetic_batch(args.batch, 21, 76, 2048, 6, 16, torch.device("cpu"))
        specs = {"bare forward": CaptureSpec(hidden=[], attn=[], full_forward=True)}
        for prober in ("layer_emb", "attention"):
            m = ProbeModule(bb, task={"name": "vrc", "kind": "region_region", "labels": [str(i) for i in range(16)]},
                            prober={"name": prober})
            specs[f"{prober} capture"] = m.plan.capture(batch)
        for name, spec in specs.items():
            g = GraphedForward(bb, engine=NoReplay())
            res = {}
            for how, fwd in (("plain", lambda s=spec: bb(batch, s)), ("graphed", lambda s=spec: g(batch, s))):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    for _ in range(3):  # recorded, then its first calls checked against the plain forward
                        fwd()
                    with Count() as c:
                        fwd()
                    res[how] = (c.n, per_call(fwd, args.iters))
            assert g.stats()["replays"] >= 2, g.stats()
            rows.append({"forward": name, "ops_plain": res["plain"][0], "ops_graphed": res["graphed"][0],
                         "host_ms_plain": 1e3 * res["plain"][1], "host_ms_graphed": 1e3 * res["graphed"][1]})
    print(f"# frozen forward, random UNITER {args.layers} x {args.hidden}, bf16 autocast, batch {args.batch}, CPU, "
          f"1 thread; graphed = host work besides the graph's launch")
    print("| forward | operators: plain | graphed (+1 launch) | host ms: plain | graphed |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['forward']} | {r['ops_plain']} | {r['ops_graphed']} | {r['host_ms_plain']:.2f} | "
              f"{r['host_ms_graphed']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
