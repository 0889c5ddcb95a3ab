"""GPU benchmark (run through ``benchmarks/gpu.sh``): a UNITER-base-size model with random weights, bf16 autocast.

Rows, all in one run on one card:

1. in memory (synthetic batches: 24 text + 76 region tokens, 6 vrc pairs per image, 2048-d features): the bare
   sdpa forward, and one online probe training step (frozen forward + every layer's head + backward + Adam) for
   ``layer_emb`` and ``attention``, each as a ratio to the bare forward (goals: <= 1.3x, <= 1.6x); and the bare
   forward with plain autocast (frozen Linear weights cast on every call, as without value_pl's cache); next to
   each, the host's issue time per batch (close to the batch time: the host bounds the step); the workloads are
   timed in interleaved rounds (``--rounds``, min per workload); and the host's issue time of each phase of the
   two steps (frozen forward, prober inputs, heads + loss, backward, optimizer): where a host-bound step's time goes;
   each also with the frozen forward replayed from CUDA graphs (``cuda_graphs.enabled=true``; ``--no-graphs`` leaves
   these rows out), after a check of the graphs against the plain forward (two shapes alternating, fresh data, every
   call compared: ``graphs_check`` in the JSON, ``disabled`` None when they agree);
2. the loader alone on real-width shards (``python -m value_pl.datasets.demo`` sizes: 36 regions x 2048-d fp16 per
   image, ~12-word captions, 6 vrc pairs): samples/s with N workers and per worker, over epochs 2..``--loader-epochs``
   of persistent workers (each timed from its first batch; the first epoch, when every reused buffer is new to the
   main process, and each epoch's wait for its first batch are reported apart); and at the first worker count,
   each batch also moved to the device through the training's transfer (``value_pl.data.pinning.to_device``), with
   the pin thread's copy (the default: on ``data.pin_threads=null`` intra-op threads, value_pl.data.pincopy; each
   batch packed into its buffer, value_pl.data.packing), with that copy in one thread (``data.pin_threads=1``, as
   before), with ``data.register_buffers=true`` (the buffers page-locked and lent to the copy) and with
   ``data.pack_batches=false`` (the other tensors by value): the main process's CPU per batch of each (its own
   thread, the pin thread and its copy threads) and the buffer counts (``--no-loader-registered`` leaves these four
   rows out);
3. end to end: ``value_pl.driver.train.train`` (DataModule + Trainer, exactly what ``python -m value_pl.train``
   runs) on those shards, batch 256, ``--epochs`` epochs validated after the last (``--val-every``), so that the
   training epochs run back to back as the parts of a long epoch would: samples/s over epochs 2..N (wall time from
   the second epoch's start to the last one's end; also without the last epoch, at whose last batch the validation
   run starts: before this version its workers were first started there; now they start with the run's, when epochs
   start ahead: ``worker_start_s`` and the main process's peak RSS say what that took), the
   share of time waiting for data, and the GPU's utilisation over that window (NVML: the driver's timestamped
   samples), against the bare forward at the same batch size and sequence length (goal >= 0.7x); with the CUDA
   graphs of the default ``cuda_graphs.enabled=null`` (``--e2e-graphs``) and with them off (``--e2e-probers``);
   and, for the probers named by ``--e2e-switch``, with the CUDA graphs and the GIL's switch interval lowered from
   Python's 5 ms to ``--switch-interval``: whether the pin thread, starved of the GIL while the host issues a step,
   is what the main thread waits for (the CPU proxy: ``benchmarks/gil_handover.py``); for the probers named by ``--e2e-registered``, with the CUDA graphs and
   ``data.register_buffers=true``; for the probers named by ``--e2e-one-copy-thread``, with the CUDA graphs and
   ``data.pin_threads=1`` (each run's buffer counts and copy threads: ``ring_buffers`` in the JSON); for those named
   by ``--e2e-no-copy-stream``, with the CUDA graphs and ``data.copy_stream=false`` (batches copied to the GPU on the
   compute stream, as before); for those named by ``--e2e-unpacked``, with the CUDA graphs and
   ``data.pack_batches=false`` (a batch's other tensors by value, pinned and copied one by one, as before); for those
   named by ``--e2e-forked``, with ``data.worker_start=fork`` (loader workers forked from the training process, as
   before the forkserver default); for those named by ``--e2e-no-gc-freeze``, with ``gc_freeze=false``; each
   ``--e2e-set PROBER:OVERRIDES`` with those overrides (combinations); the list ``--e2e-rounds`` times (then one row
   per set-up: its rounds and their median, ``rounds`` in the JSON). Each run's
   per-epoch seconds in garbage collection are in its ``epochs`` (``gc_s``, ``gc_full``), and the CPU share of each
   thread of the main process and of the loader workers over its window in ``cpu_shares`` (``cpu_share.py``).

Needs only what a GPU image has plus this repo (no MiniLM: a synthetic WordPiece vocabulary is written).
``--device cpu --layers 2 --hidden 64 --batch 4 --iters 2 --train-images 64 --epochs 2`` checks the script on CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def offline_tokenizer(d: Path) -> str:
    """A bert-base-sized WordPiece tokenizer written locally: special tokens, the demo's words, characters."""
    from transformers import BertTokenizerFast

    from value_pl.datasets import demo

    words = sorted({w for name, _ in demo.CLASSES for w in name.split()} | set(demo.ADJ)
                   | {w for v in demo.VERBS for w in v.split()} | {"a", "the", "and", "."})
    chars = [chr(c) for c in range(33, 127)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + chars + ["##" + c for c in chars]
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(str(d))
    return str(d)


def model_config(tmp: Path, layers: int, hidden: int, heads: int) -> str:
    p = tmp / "uniter.json"
    p.write_text(json.dumps({"vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers,
                             "num_attention_heads": heads, "intermediate_size": 4 * hidden,
                             "max_position_embeddings": 512, "type_vocab_size": 2}))
    return str(p)


def synthetic_batch(B: int, T: int, R: int, dv: int, pairs: int, C: int, device, seed: int = 0) -> dict:
    """A collated vrc batch with the keys the collator makes (pair positions, rows, slots)."""
    g = torch.Generator().manual_seed(seed)
    tl = torch.randint(T // 2, T + 1, (B,), generator=g)
    rl = torch.randint(max(10, R // 2), R + 1, (B,), generator=g)
    ids = torch.randint(1000, 20000, (B, T), generator=g)
    tmask = (torch.arange(T)[None] < tl[:, None]).long()
    ids = ids * tmask
    special = torch.zeros(B, T, dtype=torch.long)
    special[:, 0] = 1
    special[torch.arange(B), tl - 1] = 1
    rmask = (torch.arange(R)[None] < rl[:, None]).long()
    pb, sa, sb, a_slot, b_slot, rows = [], [], [], [], [], []
    for b in range(B):
        need: dict[int, int] = {}
        for _ in range(pairs):
            i, j = torch.randperm(int(rl[b]), generator=g)[:2].tolist()
            pb.append(b)
            sa.append((i, i + 1))
            sb.append((j, j + 1))
            a_slot.append(need.setdefault(i, len(need)))
            b_slot.append(need.setdefault(j, len(need)))
        rows.append(list(need))
    width = max(len(r) for r in rows)
    rows_t = torch.full((B, width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        rows_t[b, :len(r)] = torch.tensor(r)
    sa_t, sb_t = torch.tensor(sa), torch.tensor(sb)
    P = len(pb)
    batch = {
        "input_ids": ids, "text_mask": tmask, "special_mask": special,
        "word_to_token": torch.stack([torch.arange(1, T + 1), torch.arange(2, T + 2)], -1)[None].expand(B, T, 2).clone(),
        "region_feats": (torch.rand(B, R, dv, generator=g) * rmask[..., None]).half(),
        "region_boxes": torch.rand(B, R, 7, generator=g), "region_mask": rmask,
        "pair_b": torch.tensor(pb), "a_span": sa_t, "b_span": sb_t,
        "a_pos": sa_t[:, :1].clone(), "b_pos": sb_t[:, :1].clone(),
        "a_valid": torch.ones(P, 1, dtype=torch.bool), "b_valid": torch.ones(P, 1, dtype=torch.bool),
        "a_slot": torch.tensor(a_slot)[:, None], "b_slot": torch.tensor(b_slot)[:, None],
        "rows": {"region": rows_t}, "labels": torch.randint(0, C, (P,), generator=g),
    }
    out = {k: (v.to(device) if torch.is_tensor(v) else {m: t.to(device) for m, t in v.items()}) for k, v in batch.items()}
    out["pair_modalities"] = ("region", "region")
    out["counts"] = {"samples": B, "pairs": P}
    return out


def measure(fn, iters: int, warmup: int, device) -> tuple[float, float, float]:
    """(seconds per call, peak memory in GiB during the calls (CPU: nan), seconds per call the host took to issue
    the calls). Issue time close to the call time means the host bounds the step (the GPU waits for launches);
    much less means the GPU does (the host runs ahead until the launch queue is full)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    issued = (time.perf_counter() - t) / iters
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return dt, peak, issued


class Utilisation:
    """GPU utilisation (NVML) while active: the driver's own timestamped samples (``nvmlDeviceGetSamples``, each
    the share of its sampling period in which a kernel ran), collected every second, and, where the driver gives
    none, this thread's readings of ``nvmlDeviceGetUtilizationRates`` every ``period`` seconds."""

    def __init__(self, period: float = 0.1):
        self.period, self.samples, self.driver, self.active = period, [], [], False
        self.last_seen = 0
        try:
            import pynvml

            pynvml.nvmlInit()
            self.h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML (CPU check)
            self.nvml = None
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _driver_samples(self) -> None:
        try:
            _, got = self.nvml.nvmlDeviceGetSamples(self.h, self.nvml.NVML_GPU_UTILIZATION_SAMPLES, self.last_seen)
        except Exception:  # noqa: BLE001 - not supported / nothing new (NVML_ERROR_NOT_FOUND)
            return
        for s in got:
            self.last_seen = max(self.last_seen, int(s.timeStamp))
            self.driver.append((s.timeStamp / 1e6, int(s.sampleValue.uiVal)))

    def _run(self):
        n = 0
        while not self.stop.is_set():
            if self.active and self.nvml is not None:
                self.samples.append((time.time(), self.nvml.nvmlDeviceGetUtilizationRates(self.h).gpu))
                n += 1
                if n % 10 == 0:
                    self._driver_samples()
            time.sleep(self.period)

    def window(self):
        self.samples, self.driver, self.active = [], [], True
        if self.nvml is not None:
            self.last_seen = int(time.time() * 1e6)

    def close(self):
        """End the window: collect the driver's last samples."""
        self.active = False
        if self.nvml is not None:
            self._driver_samples()

    def mean(self, start: float = 0.0, end: float = float("inf")) -> tuple[float, str, dict]:
        """Mean utilisation (%) over ``start``..``end`` (time.time()) and its source -- the driver's samples that
        ended inside it, else the polled readings taken inside it -- and both means with their sample counts."""
        self.close()
        both = {}
        for name, src in (("driver", self.driver), ("polled", self.samples)):
            xs = [u for t, u in src if start <= t <= end]
            both[name] = (sum(xs) / len(xs) if xs else float("nan"), len(xs))
        for name, (m, k) in both.items():
            if k:
                return m, f"{name}, {k} samples", both
        return float("nan"), "none", both


def online_step(m, batch: dict, ac: dict):
    """One online probe training step of module ``m`` on ``batch``: frozen forward and heads under autocast
    ``ac``, backward, and the optimizer training uses (fused Adam on CUDA)."""
    opt = m.configure_optimizers()

    def step():
        with torch.autocast(**ac):
            loss = m.loss(m.extract_inputs(batch), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


PHASES = ("frozen forward", "prober inputs", "heads + loss", "backward", "optimizer")


def phase_issue_ms(m, batch: dict, ac: dict, iters: int, device) -> dict[str, float]:
    """Host milliseconds per step that each phase of :func:`online_step` takes to *issue* (no synchronisation
    inside the step), min over ``iters`` steps after 2 warm-up steps. On a GPU that waits for the host these are the
    phases' host costs, and they say where a step's host time goes; a phase that waits for the device (a full
    launch queue, an allocation) shows up inflated."""
    opt = m.configure_optimizers()
    best = dict.fromkeys(PHASES, float("inf"))
    for i in range(iters + 2):
        t = [time.perf_counter()]
        with torch.autocast(**ac):
            with torch.no_grad():
                out, spec = m._forward(batch, m.plan.capture(batch))  # CUDA graphs where the module uses them
                t.append(time.perf_counter())
                inputs = m.plan.inputs(out, batch, spec)
                t.append(time.perf_counter())
            loss = m.loss(inputs, batch["labels"])
            t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            for k, name in enumerate(PHASES):
                best[name] = min(best[name], 1e3 * (t[k + 1] - t[k]))
    return best


def graphs_check(bb, args, dev) -> dict:
    """CUDA graphs against the plain forward before anything is timed: batches of two shapes, alternating, fresh
    data every call, every call checked by the wrapper's ``verify`` on the same inputs, for each prober's capture."""
    from value_pl.backbones.graphs import GraphedForward
    from value_pl.probers.features import PairPlan

    out = {}
    for prober in ("layer_emb", "attention"):
        plan = PairPlan.make(bb.pair_layout("region_region"), "region_region", prober, None)
        g = GraphedForward(bb, verify=1000)
        for i, T in enumerate((24, 37, 24, 37, 24, 37)):
            batch = synthetic_batch(args.batch, T, 76, 2048, 6, 16, dev, seed=100 + i)
            with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
                g(batch, plan.capture(batch))
        out[prober] = g.stats()
        print(f"# cuda graphs check, {prober} capture: {out[prober]}", flush=True)
    return out


def in_memory_rows(args, dev, tok: str, tmp: Path) -> tuple[list[tuple], dict, dict | None]:
    from value_pl.backbones.uniter import build_uniter
    from value_pl.probers.module import ProbeModule

    bb = build_uniter(OmegaConf.create({"name": "random-uniter-base", "pretrained": False, "tokenizer": tok,
                                        "config": model_config(tmp, args.layers, args.hidden, args.heads), "seed": 0}),
                      img_dim=2048).to(dev)
    B, T, R, C = args.batch, 24, 76, 16
    batch = synthetic_batch(B, T, R, 2048, 6, C, dev)
    ac = dict(device_type=dev.type, dtype=torch.bfloat16)
    checked = graphs_check(bb, args, dev) if args.graphs else None

    bare = bare_forward(bb, batch, ac)
    bare_plain = bare_forward(bb, batch, ac, plain_autocast=True)
    fns = {f"bare sdpa forward (batch {B})": bare,
           f"  bare forward, Linear weights cast on every call (plain autocast; batch {B})": bare_plain}
    steps, modules, graphed = {}, {}, {}
    if args.graphs:
        fns[f"  bare forward, CUDA graphs (batch {B})"] = bare_forward(bb, batch, ac, graphs=graphed)
    for prober in ("layer_emb", "attention"):
        for graphs in (False, True) if args.graphs else (False,):
            m = ProbeModule(bb, task={"name": "vrc", "kind": "region_region", "labels": [str(i) for i in range(C)]},
                            prober={"name": prober}, seed=0).to(dev)
            name = prober + (", CUDA graphs" if graphs else "")
            if graphs:
                m.use_cuda_graphs(True)
                graphed[name] = m.graphs
            modules[name] = m
            steps[name] = fns[f"online training step, {name} ({len(m.head_names)} heads)"] = online_step(m, batch, ac)
    timed = measure_rounds(fns, args.rounds, args.iters, args.warmup, dev)
    phases = {name: phase_issue_ms(m, batch, ac, args.iters, dev) for name, m in modules.items()}
    for name, g in graphed.items():
        print(f"# cuda graphs, {name}: {g.stats()}", flush=True)
    if args.profile and dev.type == "cuda":
        for name, step in steps.items():
            profile_step(step, f"{name} step")
        profile_step(bare, "bare forward")
    return [(name, *timed[name], B) for name in fns], phases, checked


def measure_rounds(fns: dict, rounds: int, iters: int, warmup: int, device) -> dict[str, tuple]:
    """:func:`measure` of every workload in turn, ``rounds`` times (A B C A B C ...): per workload the round with
    the least time per call (and its issue time), and the highest peak memory. Interleaving and the minimum keep a
    shared machine's drift (clocks, other tenants) out of the ratios; one pass of each moved them by up to 40%."""
    best: dict[str, tuple] = {}
    peaks: dict[str, float] = {}
    for r in range(rounds):
        for name, fn in fns.items():
            dt, peak, issued = measure(fn, iters, warmup if r == 0 else 1, device)
            peaks[name] = max(peaks.get(name, peak), peak)
            if name not in best or dt < best[name][0]:
                best[name] = (dt, issued)
    return {n: (best[n][0], peaks[n], best[n][1]) for n in fns}


def bare_forward(bb, batch: dict, ac: dict, plain_autocast: bool = False, graphs: dict | None = None):
    """A call of ``bb``'s bare forward (no capture, every layer) under autocast ``ac``. ``plain_autocast``: on a
    copy of ``bb`` whose frozen Linear weights autocast casts on every call, as without value_pl's cache.
    ``graphs`` (a dict): replayed from CUDA graphs, the wrapper put into ``graphs["bare forward"]``."""
    from value_pl.backbones.autocast_cache import uncache_autocast_weights
    from value_pl.backbones.capture import CaptureSpec
    from value_pl.backbones.graphs import GraphedForward

    if plain_autocast:
        bb = copy.deepcopy(bb)
        uncache_autocast_weights(bb)
    spec = CaptureSpec(hidden=[], attn=[], full_forward=True)
    fwd = bb
    if graphs is not None:
        fwd = graphs["bare forward"] = GraphedForward(bb)

    def call():
        with torch.no_grad(), torch.autocast(**ac):
            fwd(batch, spec)

    return call


def profile_step(fn, name: str) -> None:
    """Host (CPU) time vs device (CUDA kernel) time of one call: which side bounds the step."""
    try:
        _profile_step(fn, name)
    except Exception as e:  # noqa: BLE001 - a diagnostic must not end the benchmark
        print(f"# profile {name}: failed ({type(e).__name__}: {e})", flush=True)


def _profile_step(fn, name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    ev = prof.key_averages()
    cuda = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ev) / 1e3
    kernels = sum(e.count for e in ev if getattr(e, "self_device_time_total", 0) > 0)
    print(f"# profile {name}: wall {1e3 * wall:.1f} ms, CUDA kernels {cuda:.1f} ms busy ({kernels} kernel calls)", flush=True)
    cpu = sum(e.self_cpu_time_total for e in ev) / 1e3
    print(f"#   host: {cpu:.1f} ms of operator time; top: " + "; ".join(
        f"{e.key[:32]} x{e.count} {e.self_cpu_time_total / 1e3:.2f} ms"
        for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:8]), flush=True)


def build_shards(root: Path, args) -> dict:
    from value_pl.datasets.demo import build_demo

    t = time.time()
    man = build_demo(root, splits={"train": args.train_images, "val": args.eval_images, "test": args.eval_images},
                     num_regions=36, feature_dim=2048, maxcount=args.maxcount)
    print(f"# shards: {args.train_images} train images x 36 regions x 2048-d fp16 in "
          f"{len(man['splits']['train']['shards'])} shard(s), built in {time.time() - t:.0f} s", flush=True)
    return man


def loader_rows(root: Path, tok: str, args) -> list[dict]:
    from value_pl.backbones.uniter import build_uniter
    from value_pl.data.collate import TaskSpec
    from value_pl.data.datamodule import ShardDataModule
    from value_pl.data.pinning import to_device

    bb = build_uniter(OmegaConf.create({"pretrained": False, "tokenizer": tok, "seed": 0,
                                        "config": model_config(Path(tempfile.mkdtemp()), 1, 64, 2)}), img_dim=2048)
    dev = torch.device(args.device)
    out = []
    # (workers, data.register_buffers, batches moved to the device, data.pin_threads: None = the default,
    # data.pack_batches): the loader alone at each count; then, at the first, moved to the device as training moves
    # them, with the pin thread's copy on the default threads and on one, with lent buffers, and not packed
    runs = [(w, False, False, None, True) for w in args.workers]
    runs += [(args.workers[0], False, True, None, True), (args.workers[0], False, True, 1, True),
             (args.workers[0], True, True, None, True), (args.workers[0], False, True, None, False)] \
        if args.loader_registered else []
    for workers, register, move, threads, pack in runs:
        # pinned on a GPU, as training gets them (the pin thread copies features out of the workers' reused buffers,
        # or lends them, page-locked, when register)
        dm = ShardDataModule(root, batch_size=args.e2e_batch, num_workers=workers, shuffle_buffer=1000, pin_memory=None,
                             prefetch_factor=prefetch_for(workers, args.e2e_batch), register_buffers=register,
                             pin_threads=threads, pack_batches=pack)
        dm.collate = bb.collator(TaskSpec("vrc", "region_region", dm.manifest["labels"]["vrc"]))
        loader = dm.loader("train", True)
        epochs = []  # (samples, samples timed, seconds, main-process CPU seconds, batches timed, first wait)
        for e in range(max(1, args.loader_epochs)):  # persistent workers: epoch 0 starts them, later ones resume
            t0 = time.perf_counter()
            it = iter(loader)
            first = next(it)
            if move:
                first = to_device(first, dev)
            # timed from each epoch's first batch on: the flow, as in an epoch of a real split (hundreds of
            # batches), not the wait for the first batch, which is reported apart
            t, c, n, nb = time.perf_counter(), time.process_time(), 0, 0
            for b in it:
                if move:  # the copy to the device, then the lent buffer's release (the next call's)
                    b = to_device(b, dev)
                n += len(b["keys"])
                nb += 1
            n_first, b, first = len(first["keys"]), None, None  # lent buffers: freed once copied or collected
            if move and dev.type == "cuda":
                torch.cuda.synchronize()  # the epoch's copies done
            epochs.append((n + n_first, n, time.perf_counter() - t, time.process_time() - c, nb, t - t0))
        steady = epochs[1:] or epochs  # the later epochs: every reused buffer already mapped
        n, dt = sum(x[1] for x in steady), sum(x[2] for x in steady)
        main_ms = 1e3 * sum(x[3] for x in steady) / max(sum(x[4] for x in steady), 1)  # this process + pin thread
        sps = n / dt
        first_sps = epochs[0][1] / epochs[0][2]
        waits = [round(1e3 * x[5]) for x in epochs]
        dm.teardown("fit")  # lent buffers: the last copies waited for and the buffers freed
        buffers = dm.buffer_stats()
        copy_threads = (buffers or {}).get("copy_threads") or threads or "default"
        how = (f", moved to {dev.type}" + (", data.register_buffers=true" if register else
                                           f", pin-thread copy in {copy_threads} thread(s)")
               + ("" if pack else ", data.pack_batches=false") if move else "")
        out.append({"workers": workers, "samples_per_s": sps, "per_worker": sps / max(workers, 1),
                    "first_epoch_samples_per_s": first_sps, "epochs": len(epochs),
                    "epoch_samples": [x[0] for x in epochs], "main_process_ms_per_batch": main_ms,
                    "first_batch_wait_ms": waits, "pinned": bool(loader.pin_memory), "moved_to_device": move,
                    "register_buffers": register, "pin_threads": threads, "pack_batches": pack,
                    "ring_buffers": buffers})
        span = f"epochs 2-{len(epochs)}" if len(epochs) > 1 else "one epoch"
        print(f"# loader, {workers} worker(s){how}: {sps:,.0f} samples/s ({sps / max(workers, 1):,.0f} per worker) "
              f"over {span} (first epoch {first_sps:,.0f}), main process {main_ms:.1f} ms CPU per batch"
              f"{' (pinned)' if loader.pin_memory else ''}; wait for each epoch's first batch {waits} ms, samples "
              f"per epoch {[x[0] for x in epochs]}" + (f"; buffers {buffers}" if move else ""), flush=True)
        del it, loader
    return out


def prefetch_for(workers: int, batch: int) -> int:
    """Batches per worker that fit in half of /dev/shm (a container's is often small): 1..4."""
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_bavail * st.f_frsize
    except OSError:
        return 2
    per_batch = batch * 36 * 2048 * 2 * 1.2  # fp16 features dominate
    return int(max(1, min(4, shm // 2 // (per_batch * max(workers, 1)))))


# the flags that each add runs with one override, in the order their runs come (after the runs with CUDA graphs)
ONE_OVERRIDE = (("e2e_unpacked", "data.pack_batches=false"), ("e2e_forked", "data.worker_start=fork"),
                ("e2e_no_gc_freeze", "gc_freeze=false"), ("e2e_no_copy_stream", "data.copy_stream=false"),
                ("e2e_one_copy_thread", "data.pin_threads=1"), ("e2e_registered", "data.register_buffers=true"))


def e2e_set_spec(spec: str) -> tuple[str, list[str]]:
    """``--e2e-set PROBER:OVERRIDE[,OVERRIDE...]`` -> (prober, overrides)."""
    prober, _, overrides = spec.partition(":")
    if not prober or not overrides:
        raise SystemExit(f"benchmarks/gpu.py: --e2e-set {spec!r}: expected PROBER:OVERRIDE[,OVERRIDE...], e.g. "
                         "attention:data.read_ahead=false")
    return prober, overrides.split(",")


def e2e_rows(root: Path, tok: str, tmp: Path, args, util: Utilisation, dev, out: list | None = None,
             done=lambda: None) -> list[dict]:
    """End-to-end runs, one per prober, appended to ``out`` as each ends (then ``done()`` is called)."""
    from hydra import compose, initialize_config_dir

    from value_pl.driver.train import train

    from cpu_share import CpuShares

    out = [] if out is None else out
    cpu = CpuShares()  # who used the CPU in each run's window (cpu_share.py)
    counts = args.e2e_workers or args.workers[:1]
    # graphs off and data.epoch_ahead=false only at the first worker count; the default set-up at every count; each
    # run: (prober, workers, switch interval or None, its overrides), in the order of what a run cut short by
    # gpu.sh's time limit should keep first
    w0, off, plain = counts[0], "cuda_graphs.enabled=false", "data.epoch_ahead=false"
    runs = ([(p, w0, None, [off]) for p in args.e2e_probers]
            + [(p, w, None, []) for w in counts for p in args.e2e_graphs]
            + [(p, w0, None, [ov]) for flag, ov in ONE_OVERRIDE for p in getattr(args, flag)]
            + [(p, w0, s, []) for p in args.e2e_switch for s in args.switch_interval]
            + [(p, w0, None, [off, plain]) for p in args.e2e_plain]
            + [(p, w0, None, ov) for p, ov in map(e2e_set_spec, args.e2e_set)])
    # --e2e-rounds: the whole list again, in the same order (drift between runs shows as a gap between rounds)
    runs = [(p, w, s, x, k) for k in range(args.e2e_rounds) for p, w, s, x in runs]
    for prober, workers, switch, extra, rnd in runs:
        graphs = off not in extra  # else the default (cuda_graphs.enabled=null: on when the model runs on a GPU)
        name = (prober + (f", {plain}" if plain in extra else "") + (", CUDA graphs" if graphs else "")
                + f", {workers} workers" + (f", switch interval {1e3 * switch:g} ms" if switch else "")
                + "".join(f", {x}" for x in extra if x not in (off, plain))
                + (f", round {rnd + 1}" if args.e2e_rounds > 1 else ""))
        run = tmp / ("run-" + "-".join("".join(c if c.isalnum() else " " for c in name).split()))
        ov = [f"prober={prober}", "task=vrc", "data=shards", f"data.root={root}", f"data.batch_size={args.e2e_batch}",
              f"data.eval_batch_size={2 * args.e2e_batch}", f"data.num_workers={workers}", "logger=none",
              f"data.prefetch_factor={prefetch_for(workers, 2 * args.e2e_batch)}",
              f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false", f"run_dir={run}",
              "trainer=gpu" if dev.type == "cuda" else "trainer=cpu", "backbone=uniter_untrained",
              f"backbone.config={model_config(tmp, args.layers, args.hidden, args.heads)}", f"backbone.tokenizer={tok}",
              "backbone.img_dim=2048", *extra, f"+trainer.check_val_every_n_epoch={args.val_every or args.epochs}"]
        if dev.type == "cuda" and not any(x.startswith("data.worker_start=") for x in extra):
            # what python -m value_pl.train does on a GPU (null keeps fork under a script's __main__, as this one)
            ov.append("data.worker_start=forkserver")
        default = sys.getswitchinterval()
        try:
            with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
                cfg = compose(config_name="train", overrides=ov)
            util.window()
            sys.setswitchinterval(switch or default)  # this process's GIL (forked loader workers inherit it)
            res = train(cfg)
        except Exception as e:  # noqa: BLE001 - one failed run must not cost the others
            import traceback

            traceback.print_exc()
            out.append({"prober": name, "error": f"{type(e).__name__}: {e}"})
            print(f"# e2e {name}: FAILED ({type(e).__name__}: {e})", flush=True)
            done()
            continue
        finally:
            sys.setswitchinterval(default)
        eps = res["throughput"].get("epochs") or [res["throughput"]["train"]]
        steady = eps[1:] or eps  # the first epoch (workers starting, graphs recorded, kernels tuned) left out
        n = sum(x["samples_per_s"] * x["seconds"] for x in steady)
        start, end = steady[0]["start"], steady[-1]["end"]
        sps = n / max(end - start, 1e-9)  # wall time from the first steady epoch's start to the last one's end
        wait = sum(x["data_wait_frac"] * x["seconds"] for x in steady) / max(sum(x["seconds"] for x in steady), 1e-9)
        busy, source, both = util.mean(start, end)
        shares = cpu.shares(start, end)
        xfer = sum((x.get("transfer_frac") or 0) * x["seconds"] for x in steady) / max(sum(x["seconds"] for x in steady),
                                                                                       1e-9)
        # the last epoch's last batch starts the validation run (before this version also its workers): the same
        # samples/s without it, and what the workers' starts took (worker_start_s) with the process's peak RSS
        first = [x["first_wait_s"] for x in steady if x.get("first_wait_s") is not None]  # each epoch's start
        first_ms = 1e3 * sum(first) / len(first) if first else None
        head = steady[:-1]
        head_sps = (sum(x["samples_per_s"] * x["seconds"] for x in head) / max(head[-1]["end"] - head[0]["start"], 1e-9)
                    if head else None)
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out.append({"prober": name, "samples_per_s": sps, "data_wait_frac": wait, "transfer_frac": xfer,
                    "first_wait_ms": first_ms,
                    "gpu_util_pct": busy,
                    "gpu_util_source": source, "gpu_util_both": both, "window_s": end - start, "steady_epochs": len(steady),
                    "last_epoch": res["throughput"]["train"], "samples_seen": res["samples_seen"]["train"],
                    "cuda_graphs": res["throughput"].get("cuda_graphs"), "epochs": eps,
                    "switch_interval_s": switch or default, "ring_buffers": res["throughput"].get("ring_buffers"),
                    "samples_per_s_before_last_epoch": head_sps, "main_peak_rss_gib": rss_gib,
                    "worker_start_s": res["throughput"].get("worker_start_s"),
                    "worker_start_method": res["throughput"].get("worker_start_method"),
                    "gc_s": sum(x.get("gc_s", 0) for x in steady), "cpu_shares": shares,
                    "best_test": res["best"]["test_acc"] if res.get("best") else None})
        print(f"# e2e {name}: {sps:,.0f} samples/s over epochs 2-{len(eps)} ({end - start:.1f} s; per epoch "
              f"{[round(x['samples_per_s']) for x in eps]}), waiting for data {100 * wait:.0f}% (copying to the device "
              f"{100 * xfer:.0f}%" + (f"; before each epoch's first batch {first_ms:.0f} ms" if first_ms is not None
                                     else "")
              + f"), GPU busy {busy:.0f}% "
              f"(NVML: {source}; {both}), samples per epoch {res['samples_seen']['train']}, cuda graphs "
              f"{res['throughput'].get('cuda_graphs')}"
              + f", buffers {res['throughput'].get('ring_buffers')}"
              + (f"; {head_sps:,.0f} samples/s without the last epoch" if head_sps else "")
              + f"; workers started ({res['throughput'].get('worker_start_method')}) in "
              f"{res['throughput'].get('worker_start_s')} s, garbage collection "
              f"{sum(x.get('gc_s', 0) for x in steady):.2f} s, CPU shares {shares}, main process peak RSS "
              f"{rss_gib:.1f} GiB", flush=True)
        done()
    cpu.stop.set()
    return out


def rounds_summary(runs: list[dict], bare: float, graphs: float | None = None) -> list[dict]:
    """``--e2e-rounds``: per set-up, its rounds' samples/s and GPU busy, and the median, in the list's order."""
    import statistics

    groups: dict[str, list[dict]] = {}
    for r in runs:
        if "error" not in r:
            groups.setdefault(r["prober"].rsplit(", round ", 1)[0], []).append(r)
    out = []
    print(f"\n| set-up, {max(len(g) for g in groups.values()) if groups else 0} rounds | samples/s per round | "
          "median | x bare forward (with CUDA graphs) | GPU busy per round | waiting for data per round |")
    print("|---|---|---:|---:|---|---|")
    for name, g in groups.items():
        sps = [r["samples_per_s"] for r in g]
        med = statistics.median(sps)
        out.append({"setup": name, "samples_per_s": sps, "median": med, "x_bare": med / bare,
                    "x_bare_graphs": med / graphs if graphs else None,
                    "gpu_util_pct": [r["gpu_util_pct"] for r in g], "data_wait_frac": [r["data_wait_frac"] for r in g]})
        print(f"| {name} | {' / '.join(f'{x:,.0f}' for x in sps)} | {med:,.0f} | {med / bare:.2f}"
              + (f" ({med / graphs:.2f})" if graphs else "") + " | "
              + " / ".join(f"{r['gpu_util_pct']:.0f}%" for r in g) + " | "
              + " / ".join(f"{100 * r['data_wait_frac']:.0f}%" for r in g) + " |")
    return out


def e2e_bare(args, dev, tok: str, tmp: Path, root: Path) -> float:
    """Bare forward samples/s on a real batch of the shards (batch ``e2e_batch``, same lengths as e2e)."""
    from value_pl.backbones.uniter import build_uniter
    from value_pl.data.collate import TaskSpec
    from value_pl.data.datamodule import ShardDataModule

    bb = build_uniter(OmegaConf.create({"pretrained": False, "tokenizer": tok, "seed": 0,
                                        "config": model_config(tmp, args.layers, args.hidden, args.heads)}),
                      img_dim=2048).to(dev)
    dm = ShardDataModule(root, batch_size=args.e2e_batch, num_workers=0)
    dm.collate = bb.collator(TaskSpec("vrc", "region_region", dm.manifest["labels"]["vrc"]))
    batch = next(iter(dm.stream("train", True)))
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
    ac = dict(device_type=dev.type, dtype=torch.bfloat16)
    fns = {"bare": bare_forward(bb, batch, ac)}
    if args.graphs:
        fns["graphs"] = bare_forward(bb, batch, ac, graphs={})
    timed = measure_rounds(fns, args.rounds, args.iters, args.warmup, dev)
    print(f"# bare forward on a shard batch: {args.e2e_batch} x ({batch['input_ids'].shape[1]} text + "
          f"{batch['region_mask'].shape[1]} regions) tokens: {args.e2e_batch / timed['bare'][0]:,.0f} samples/s"
          + (f"; with CUDA graphs {args.e2e_batch / timed['graphs'][0]:,.0f}" if "graphs" in timed else ""), flush=True)
    return {k: args.e2e_batch / v[0] for k, v in timed.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the in-memory workloads (min)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train-images", type=int, default=8000)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--maxcount", type=int, default=1000)
    ap.add_argument("--e2e-batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=6, help="end-to-end training epochs (the first is left out)")
    ap.add_argument("--val-every", type=int, default=None,
                    help="end to end: validate every N epochs (default: after the last only, so that the training "
                         "epochs run back to back as in a long epoch)")
    ap.add_argument("--loader-epochs", type=int, default=3, help="epochs of the loader alone (the first left out)")
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 15, 4],
                    help="loader workers of the loader rows; the first is used end to end (8 of 16 cores fed the H200 "
                         "best: docs/performance.md)")
    ap.add_argument("--e2e-workers", type=int, nargs="*", default=[],
                    help="loader workers of the end-to-end runs (default: the first of --workers); the runs with CUDA "
                         "graphs at each count, the others at the first")
    ap.add_argument("--e2e-probers", nargs="*", default=["layer_emb", "attention"],
                    help="probers to run end to end with CUDA graphs off (none: leave these runs out)")
    ap.add_argument("--e2e-plain", nargs="*", default=[],
                    help="probers to run end to end also with data.epoch_ahead=false (last; ~20 s each)")
    ap.add_argument("--e2e-graphs", nargs="*", default=["layer_emb", "attention"],
                    help="probers to run end to end also with the CUDA graphs (the default on one GPU; after the runs "
                         "with graphs off)")
    ap.add_argument("--e2e-switch", nargs="*", default=[],
                    help="probers to run end to end also with CUDA graphs and sys.setswitchinterval(--switch-interval) "
                         "(after the registered runs; does the GIL starve the pin thread while the host issues a step?)")
    ap.add_argument("--e2e-registered", nargs="*", default=[],
                    help="probers to run end to end also with CUDA graphs and data.register_buffers=true (loader "
                         "buffers page-locked and lent to the copy to the GPU; the default since runs 6-8, so these "
                         "repeat the default rows; after the one-copy-thread runs)")
    ap.add_argument("--e2e-unpacked", nargs="*", default=[],
                    help="probers to run end to end also with CUDA graphs and data.pack_batches=false (a batch's "
                         "other tensors cross by value and are pinned and copied one by one, as before "
                         "value_pl.data.packing; right after the runs with CUDA graphs)")
    ap.add_argument("--e2e-no-copy-stream", nargs="*", default=[],
                    help="probers to run end to end also with CUDA graphs and data.copy_stream=false (each batch "
                         "copied to the GPU on the compute stream, as before; after the unpacked runs)")
    ap.add_argument("--e2e-one-copy-thread", nargs="*", default=[],
                    help="probers to run end to end also with CUDA graphs and data.pin_threads=1 (the pin thread "
                         "copies each batch's features alone, as before value_pl.data.pincopy; after the "
                         "no-copy-stream runs)")
    ap.add_argument("--e2e-forked", nargs="*", default=[],
                    help="probers to run end to end also with CUDA graphs and data.worker_start=fork (loader workers "
                         "forked from the training process, as before; after the unpacked runs)")
    ap.add_argument("--e2e-no-gc-freeze", nargs="*", default=[],
                    help="probers to run end to end also with CUDA graphs and gc_freeze=false (full garbage "
                         "collections walk the whole heap, as before; after the forked runs)")
    ap.add_argument("--e2e-set", nargs="*", default=[],
                    help="more end-to-end runs with CUDA graphs, each PROBER:OVERRIDE[,OVERRIDE...] (e.g. "
                         "attention:data.register_buffers=true,data.worker_start=fork); after all the others")
    ap.add_argument("--e2e-rounds", type=int, default=1,
                    help="run the whole end-to-end list this many times, in order (each row says its round)")
    ap.add_argument("--no-loader-registered", dest="loader_registered", action="store_false",
                    help="leave out the loader rows that move batches to the device (pin-thread copy in the default "
                         "threads and in one, registered, not packed)")
    ap.add_argument("--switch-interval", type=float, nargs="+", default=[0.0002],
                    help="seconds (Python's default: 0.005); one --e2e-switch run per value and prober")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="leave out the in-memory rows with CUDA graphs")
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: memory loader e2e")
    ap.add_argument("--profile", action="store_true", help="profile one step of each (host vs device time)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device visible (torch.cuda.is_available() is False); "
              "use --device cpu with a small model to check the script", file=sys.stderr)
        return 2
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")
        gpu = f"{torch.cuda.get_device_name(dev)} ({torch.cuda.get_device_properties(dev).total_memory / 2**30:.0f} GiB)"
    else:
        gpu = "CPU (script check only)"
    print(f"# value-pl GPU benchmark: {gpu}, torch {torch.__version__}, bf16 autocast, {os.cpu_count()} CPU cores, "
          f"prefetch {prefetch_for(args.workers[0], args.e2e_batch)} batches per worker")
    print(f"# model: random UNITER {args.layers} layers x {args.hidden} hidden x {args.heads} heads", flush=True)
    report = {"device": gpu, "torch": torch.__version__, "cpus": os.cpu_count()}

    def save() -> None:  # after every part: a run cut short by gpu.sh's time limit keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    util = Utilisation()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        tok = offline_tokenizer(tmp / "tokenizer")
        if "memory" not in args.skip:
            rows, phases, checked = in_memory_rows(args, dev, tok, tmp)
            base = rows[0][1]
            print("\n| workload (in memory, batch %d, 100 tokens) | samples/s | ms / batch | x bare forward | "
                  "host issue ms / batch | peak GiB |" % args.batch)
            print("|---|---:|---:|---:|---:|---:|")
            for name, dt, peak, issued, B in rows:
                print(f"| {name} | {B / dt:,.0f} | {1e3 * dt:.1f} | {dt / base:.2f} | {1e3 * issued:.1f} | {peak:.2f} |")
            report["in_memory"] = [{"workload": n, "samples_per_s": B / dt, "ms": 1e3 * dt, "x_bare": dt / base,
                                    "issue_ms": 1e3 * i, "peak_gib": p} for n, dt, p, i, B in rows]
            print(f"\n| host issue ms per step, by phase (min of {args.iters} steps) | " + " | ".join(PHASES) + " |")
            print("|---|" + "---:|" * len(PHASES))
            for prober, ph in phases.items():
                print(f"| {prober} | " + " | ".join(f"{ph[k]:.2f}" for k in PHASES) + " |")
            report["phase_issue_ms"] = phases
            report["graphs_check"] = checked
            save()
            print(flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        root = tmp / "shards"
        if "loader" not in args.skip or "e2e" not in args.skip:
            build_shards(root, args)
        if "loader" not in args.skip:
            report["loader"] = loader_rows(root, tok, args)
            save()
        if "e2e" not in args.skip:
            bares = e2e_bare(args, dev, tok, tmp, root)
            bare = bares["bare"]
            report["e2e"] = {"bare_samples_per_s": bare, "bare_graphs_samples_per_s": bares.get("graphs"), "runs": []}
            e2e = e2e_rows(root, tok, tmp, args, util, dev, out=report["e2e"]["runs"], done=save)
            print(f"\n| end to end (batch {args.e2e_batch}) | samples/s | x bare forward | without the last epoch | "
                  "waiting for data | GPU busy | samples per epoch |")
            print("|---|---:|---:|---:|---:|---:|---|")
            print(f"| bare forward on shard batches | {bare:,.0f} | 1.00 | - | - | - | - |")
            if "graphs" in bares:
                print(f"| bare forward on shard batches, CUDA graphs | {bares['graphs']:,.0f} | "
                      f"{bares['graphs'] / bare:.2f} | - | - | - | - |")
            for r in e2e:
                if "error" in r:
                    print(f"| train {r['prober']} | failed: {r['error'][:80]} | - | - | - | - | - |")
                    continue
                head = r["samples_per_s_before_last_epoch"]
                print(f"| train {r['prober']} (epochs 2-{len(r['epochs'])}) | {r['samples_per_s']:,.0f} | "
                      f"{r['samples_per_s'] / bare:.2f} | " + (f"{head / bare:.2f}x" if head else "-")
                      + f" | {100 * r['data_wait_frac']:.0f}% | {r['gpu_util_pct']:.0f}% | {r['samples_seen']} |")
            if args.e2e_rounds > 1:
                report["e2e"]["rounds"] = rounds_summary(e2e, bare, bares.get("graphs"))
    util.stop.set()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
