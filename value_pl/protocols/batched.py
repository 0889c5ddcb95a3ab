"""Many SentEval classifiers (:class:`~value_pl.probers.heads.SentenceProber`) trained at once on cached features.

A *unit* is one classifier: the features of one layer, SentEval hyper-parameters (nhid, dropout, L2) and its
seeded initial weights. :func:`train_units` trains every unit together and gives each the result it would get
if trained alone with Adam on mini-batch cross-entropy (:func:`~value_pl.protocols.senteval.fit_senteval`,
:func:`~value_pl.protocols.fitting.fit_head`):

* **One permutation stream.** Pass k uses the k-th ``randperm`` of a generator seeded with ``seed``, for every
  unit, exactly as each sequential fit does; a pass's rows are gathered once per layer and serve all the units
  of that layer.
* **Banks** (:class:`_Bank`): the first-layer weights of many units stacked as rows of one matrix (an MLP unit
  contributes its nhid hidden rows, a logistic-regression unit its C logit rows), so the first layer and its
  weight gradient are one GEMM each; second layers run as one ``bmm`` per nhid. Grouped by nhid rather than
  padded to the largest: every unit computes exactly its own MLP, and no work goes to padding. On CPU one bank
  per (layer, nhid), each running its whole share of a pass before the next starts (its weights and Adam
  moments stay in cache), and with several torch threads the banks run in parallel in worker threads at one
  intra-op thread each (no per-operation thread synchronisation, bit-identical results); on GPU one bank per
  layer (fewer, larger kernels). Forward and backward are written out by hand: softmax cross-entropy (mean over
  the batch), sigmoid, dropout with keep-probability 1 - p and scale 1/(1 - p) per unit.
* **Adam per unit.** Each unit's weights, gradients and moments are views into its bank's tensors; the update
  is ``torch._fused_adam_`` (the kernel behind ``torch.optim.Adam(fused=True)``) over the views of all units
  sharing an L2 value (weight decay is a scalar of the call), with one step count: all units start together.
  Without that kernel the same update is done with tensor ops (:func:`_adam_ops`).
* **Early stopping per unit.** After every ``passes_per_eval`` passes all active units are scored on dev in
  one pass (large batches); a unit that improves saves a copy of its weights, a unit out of patience stops:
  its bank is rebuilt without it, so a stopped unit costs nothing and keeps its best-dev state.

Differences from training each unit alone: floating-point rounding (the GEMMs sum in another order) and the
dropout masks (drawn from a generator seeded with ``seed`` for the whole run instead of the global stream).
Units without dropout follow the sequential trajectory to rounding error.
"""
from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..probers.heads import SentenceProber


@dataclass(frozen=True)
class Unit:
    """One classifier: ``layer`` indexes the feature lists given to :func:`train_units`; ``init`` is the
    :class:`~value_pl.probers.heads.SentenceProber` state dict it starts from."""
    layer: int
    nhid: int
    dropout: float
    l2: float
    init: dict


@dataclass(frozen=True)
class StopRule:
    """When a unit is scored and when it stops.

    A unit improves when its score (accuracy, or minus the loss) exceeds its best by more than ``min_delta``.

    * ``senteval=False`` (:func:`~value_pl.protocols.fitting.fit_head`, MDL: ``metric="loss"``, one pass per
      evaluation, ``min_delta=1e-6``): the usual early stopping -- a unit stops after ``patience`` consecutive
      evaluations without improvement, and training ends after ``max_passes`` passes.
    * ``senteval=True``: SentEval's ``PyTorchClassifier.fit`` exactly (``metric="acc"``, ``patience`` = tenacity,
      ``passes_per_eval`` = epoch_size, ``max_passes`` = max_epoch). Its counter of evaluations without
      improvement is never reset, and it is checked before it is incremented, so a unit stops at its
      (tenacity + 1)-th non-improving evaluation counted over the whole fit; and it trains on while the passes
      so far are <= max_epoch (``while not stop_train and self.nepoch <= self.max_epoch``), i.e. at most
      ``(max_epoch // epoch_size + 1) * epoch_size`` passes (204 for SentEval's 200 and 4).
    """
    metric: str = "acc"
    patience: int = 5
    passes_per_eval: int = 4
    max_passes: int = 200
    min_delta: float = 0.0
    senteval: bool = False

    def pass_cap(self) -> int:
        """The most passes a unit can train."""
        per = max(1, int(self.passes_per_eval))
        if self.senteval:
            return (int(self.max_passes) // per + 1) * per
        return math.ceil(self.max_passes / per) * per

    def trains_on(self, done_passes: int) -> bool:
        """Whether another round of ``passes_per_eval`` passes runs after ``done_passes``."""
        return done_passes <= self.max_passes if self.senteval else done_passes < self.max_passes

    def stops(self, bad: int) -> tuple[bool, int]:
        """A non-improving evaluation, with ``bad`` of them counted before it: (stop now, the new count)."""
        if self.senteval:  # check, then count: `if early_stop_count >= tenacity: stop; early_stop_count += 1`
            return bad >= self.patience, bad + 1
        return bad + 1 >= self.patience, bad + 1


def unit_of(head: SentenceProber, layer: int, l2: float = 0.0) -> Unit:
    """The unit of an existing :class:`SentenceProber` (its current weights are the initial state)."""
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    if isinstance(head.net, nn.Linear):
        return Unit(layer, 0, 0.0, float(l2), state)
    return Unit(layer, int(head.net[0].out_features), float(head.net[1].p), float(l2), state)


def pieces_of(state: dict, nhid: int) -> list[Tensor]:
    if nhid:
        return [state["net.0.weight"], state["net.0.bias"], state["net.3.weight"], state["net.3.bias"]]
    return [state["net.weight"], state["net.bias"]]


def state_of(pieces: list[Tensor], nhid: int) -> dict:
    p = [t.detach().to("cpu", copy=True) for t in pieces]
    if nhid:
        return {"net.0.weight": p[0], "net.0.bias": p[1], "net.3.weight": p[2], "net.3.bias": p[3]}
    return {"net.weight": p[0], "net.bias": p[1]}


class _Group:
    """Units of one bank with the same nhid (0: logistic regression): contiguous rows of the first matrix; the
    units with dropout come last (from ``j0`` on), so one mask covers them."""

    def __init__(self, h: int, ids: list[int], r0: int, C: int, drops: list[float], device):
        self.h, self.ids, self.r0 = h, ids, r0
        self.rows = h or C
        self.r1 = r0 + len(ids) * self.rows
        self.j0 = next((j for j, p in enumerate(drops) if p > 0), None) if h else None
        if self.j0 is not None:
            p = drops[self.j0:]
            self.p = torch.tensor(p, dtype=torch.float32, device=device)[:, None, None]
            self.scale = 1.0 / (1.0 - self.p)  # torch.nn.Dropout's scale
            self.thr = np.array([round(q * 65536) for q in p], dtype=np.uint16)[:, None, None]
            self.scale_np = self.scale.cpu().numpy()


class _Dropout:
    """Keep-masks, already scaled by 1/(1 - p), for a group's units with dropout; one random stream per bank.
    GPU: float uniforms from the device's generator, kept when >= p. CPU: 16-bit uniforms, four per 64-bit draw
    of numpy's PCG64 (several times cheaper than torch's Mersenne twister, whose draws would be a large share of
    the step), kept when >= round(p * 2^16): the drop probability is p to within 2^-17."""

    def __init__(self, seed: int, key: tuple, device: torch.device):
        ss = np.random.SeedSequence([int(seed), *key])  # independent of the order the banks run in
        self.host = device.type == "cpu"
        self.bits = np.random.PCG64(ss) if self.host else None
        self.gen = None if self.host else torch.Generator(device=device).manual_seed(int(ss.generate_state(1)[0]))
        self.device = device

    def mask(self, g: _Group, B: int) -> Tensor:
        shape = (len(g.ids) - g.j0, g.h, B)
        if not self.host:
            return torch.where(torch.rand(shape, generator=self.gen, device=self.device) >= g.p, g.scale, 0.0)
        n = shape[0] * shape[1] * shape[2]
        u16 = self.bits.random_raw(-(-n // 4)).view(np.uint16)[:n].reshape(shape)
        return torch.from_numpy((u16 >= g.thr) * g.scale_np)


class _Bank:
    """The active units on one layer's features. Parameters, gradients and Adam moments are dicts of tensors in
    one layout: ``w1`` (R, d) and ``b1`` (R,) hold every unit's first-layer rows; ``w2_k`` (G_k, C, h_k) and
    ``b2_k`` (G_k, C) the second layers of group k. :meth:`views` cuts them into per-unit pieces."""

    def __init__(self, ids: list[int], units: list[Unit], C: int, d: int, pieces: dict, device):
        self.C, self.d, self.device = C, d, device
        # stable sort: grid order inside a group, units with dropout last
        order = sorted(ids, key=lambda u: (units[u].nhid == 0, units[u].nhid, units[u].dropout > 0))
        self.groups, r = [], 0
        for h in dict.fromkeys(units[u].nhid for u in order):
            g_ids = [u for u in order if units[u].nhid == h]
            self.groups.append(_Group(h, g_ids, r, C, [units[u].dropout for u in g_ids], device))
            r = self.groups[-1].r1
        self.ids = [u for g in self.groups for u in g.ids]
        self.R = r
        self.p, self.m, self.v, self.g = (self._zeros() for _ in range(4))
        self.pv, self.mv, self.vv, self.gv = (self.views(t) for t in (self.p, self.m, self.v, self.g))
        for i, u in enumerate(self.ids):  # pieces[u] = (params, exp_avg, exp_avg_sq); None: zeros
            for dst, src in zip((self.pv[i], self.mv[i], self.vv[i]), pieces[u]):
                for a, b in zip(dst, src or ()):
                    a.copy_(b)

    def _zeros(self) -> dict:
        z = {"w1": torch.zeros(self.R, self.d, device=self.device), "b1": torch.zeros(self.R, device=self.device)}
        for k, g in enumerate(self.groups):
            if g.h:
                z[f"w2_{k}"] = torch.zeros(len(g.ids), self.C, g.h, device=self.device)
                z[f"b2_{k}"] = torch.zeros(len(g.ids), self.C, device=self.device)
        return z

    def views(self, t: dict) -> list[list[Tensor]]:
        out = []
        for k, g in enumerate(self.groups):
            for j in range(len(g.ids)):
                a = g.r0 + j * g.rows
                v = [t["w1"][a:a + g.rows], t["b1"][a:a + g.rows]]
                out.append(v + ([t[f"w2_{k}"][j], t[f"b2_{k}"][j]] if g.h else []))
        return out

    def grads(self, xb: Tensor, onehot: Tensor, drop: _Dropout) -> None:
        """Every unit's gradient of its mean cross-entropy on the batch (``onehot``: the labels, (C, B)), in
        training mode, into ``self.g``."""
        B, p, gr = xb.shape[0], self.p, self.g
        zt = torch.addmm(p["b1"][:, None], p["w1"], xb.t())  # (R, B): all first layers in one GEMM
        dz = torch.empty_like(zt)
        for k, g in enumerate(self.groups):
            G = len(g.ids)
            z = zt[g.r0:g.r1].view(G, g.rows, B)
            dzg = dz[g.r0:g.r1].view(G, g.rows, B)
            if g.h:
                j0, mask = g.j0, None
                if j0 is None:
                    s = torch.sigmoid(z)  # (G, h, B)
                else:
                    mask = drop.mask(g, B)
                    s = torch.empty_like(z)
                    torch.sigmoid(z[:j0], out=s[:j0])
                    torch.sigmoid(z[j0:] * mask, out=s[j0:])
                o = torch.baddbmm(p[f"b2_{k}"][:, :, None], p[f"w2_{k}"], s)  # (G, C, B)
            else:
                o = z
            do = torch.softmax(o, dim=1).sub_(onehot).div_(B)  # d(mean cross-entropy)/d(logits)
            if g.h:
                torch.bmm(do, s.transpose(1, 2), out=gr[f"w2_{k}"])
                torch.sum(do, dim=2, out=gr[f"b2_{k}"])
                ds = torch.ops.aten.sigmoid_backward(torch.bmm(p[f"w2_{k}"].transpose(1, 2), do), s)
                if mask is None:
                    dzg.copy_(ds)
                else:
                    dzg[:j0].copy_(ds[:j0])
                    torch.mul(ds[j0:], mask, out=dzg[j0:])
            else:
                dzg.copy_(do)
        torch.mm(dz, xb, out=gr["w1"])
        torch.sum(dz, dim=1, out=gr["b1"])

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Eval-mode logits ``(units, C, N)`` of every unit (bank order) on ``x`` (N, d)."""
        zt = torch.addmm(self.p["b1"][:, None], self.p["w1"], x.t())
        outs = []
        for k, g in enumerate(self.groups):
            z = zt[g.r0:g.r1].view(len(g.ids), g.rows, x.shape[0])
            outs.append(torch.baddbmm(self.p[f"b2_{k}"][:, :, None], self.p[f"w2_{k}"], torch.sigmoid(z)) if g.h else z)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @torch.no_grad()
    def score(self, x: Tensor, y: Tensor, metric: str, batch: int) -> list[float]:
        """Per unit (bank order): dev accuracy, computed as ``fitting.accuracy`` does (the float32 mean of the
        0/1 hits, so equal hit counts give equal floats), or the mean cross-entropy (summed in float64)."""
        parts = []
        for i in range(0, x.shape[0], batch):
            lg, yy = self.logits(x[i:i + batch]), y[i:i + batch]
            if metric == "acc":
                parts.append(lg.argmax(1) == yy)
            else:
                ce = F.cross_entropy(lg, yy.expand(lg.shape[0], -1), reduction="none")
                parts.append(ce.sum(1, dtype=torch.float64))
        if metric == "acc":
            return [float(row.float().mean()) for row in torch.cat(parts, dim=1).cpu()]  # on CPU, as there
        return (torch.stack(parts).sum(0) / y.shape[0]).tolist()


def _adam_ops(params, grads, ms, vs, step: int, lr: float, wd: float, b1=0.9, b2=0.999, eps=1e-8) -> None:
    """``torch.optim.Adam``'s single-tensor update (L2 added to the gradient), for devices without the fused kernel."""
    bc1, bc2 = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
    for p, g, m, v in zip(params, grads, ms, vs):
        if wd:
            g = g.add(p, alpha=wd)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(m, (v.sqrt() / bc2).add_(eps), value=-lr / bc1)


class _Adam:
    """Adam over one bank's per-unit views, one call per distinct L2 value; ``t`` = the step count of every unit."""

    def __init__(self, bank: _Bank, units: list[Unit], lr: float):
        self.lr = lr
        self.step_t = torch.zeros((), dtype=torch.float32, device=bank.device)
        self.fused = hasattr(torch, "_fused_adam_") and torch.device(bank.device).type in ("cpu", "cuda")
        self.lists: dict[float, tuple[list, ...]] = {}
        for i, u in enumerate(bank.ids):
            ls = self.lists.setdefault(units[u].l2, ([], [], [], []))
            for dst, src in zip(ls, (bank.pv[i], bank.gv[i], bank.mv[i], bank.vv[i])):
                dst.extend(src)

    def step(self, t: int) -> None:
        self.step_t.fill_(t)
        for wd, (ps, gs, ms, vs) in self.lists.items():
            if self.fused:
                torch._fused_adam_(ps, gs, ms, vs, [], [self.step_t] * len(ps), lr=self.lr, beta1=0.9, beta2=0.999,
                                   weight_decay=wd, eps=1e-8, amsgrad=False, maximize=False)
            else:
                _adam_ops(ps, gs, ms, vs, t, self.lr, wd)


def _bar(enabled: bool, total: int, desc: str):
    if not (enabled and sys.stdout.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="config-pass", file=sys.stdout, dynamic_ncols=True, mininterval=0.5)


def train_units(xs: list[Tensor], y: Tensor, xs_dev: list[Tensor] | None, y_dev: Tensor | None, units: list[Unit],
                num_classes: int, *, lr: float = 1e-3, batch_size: int = 64, rule: StopRule = StopRule(),
                seed: int = 1111, device="cpu", progress: bool = False, eval_batch: int | None = None,
                desc: str = "probes", bank_by_nhid: bool | None = None) -> list[dict]:
    """Train every unit on ``(xs[unit.layer], y)``; returns per unit ``{"state": best state dict (CPU), "score":
    best dev accuracy or loss, "passes": passes over train}`` (no dev data: the last state, score None).
    ``bank_by_nhid``: one bank per (layer, nhid) instead of per layer (default: on CPU)."""
    device = torch.device(device)
    eval_batch = eval_batch or (16384 if device.type == "cuda" else 2048)
    layers = sorted({u.layer for u in units})
    X = {li: xs[li].to(device, torch.float32) for li in layers}
    y = y.to(device)
    has_dev = xs_dev is not None and y_dev is not None and y_dev.numel() > 0
    Xd = {li: xs_dev[li].to(device, torch.float32) for li in layers} if has_dev else {}
    yd = y_dev.to(device) if has_dev else None
    C, n = int(num_classes), int(y.shape[0])
    init = {i: (pieces_of(u.init, u.nhid), None, None) for i, u in enumerate(units)}
    # CPU: one bank per (layer, nhid), whose weights and Adam moments stay in cache through its part of a pass;
    # GPU: one bank per layer (fewer, larger kernels)
    by_nhid = device.type == "cpu" if bank_by_nhid is None else bank_by_nhid
    key = (lambda u: (u.layer, u.nhid)) if by_nhid else (lambda u: (u.layer,))
    banks = {k: _Bank([i for i, u in enumerate(units) if key(u) == k], units, C, X[k[0]].shape[1], init, device)
             for k in sorted({key(u) for u in units})}
    del init
    opts = {k: _Adam(b, units, lr) for k, b in banks.items()}
    perm_gen = torch.Generator().manual_seed(int(seed))  # the sequential fits' permutation stream
    drops = {k: _Dropout(int(seed), k, device) for k in banks}
    sign = 1.0 if rule.metric == "acc" else -1.0
    best = [-math.inf] * len(units)
    best_state: list = [None] * len(units)
    bad, passes = [0] * len(units), [0] * len(units)
    done_passes, per_eval, t = 0, max(1, int(rule.passes_per_eval)), 0
    cap = rule.pass_cap()
    bar = _bar(progress, cap * len(units), desc)
    active = len(units)

    def run_pass(k, xp, onehot, t0):  # one bank's share of a pass: every batch in the pass's order
        b, opt = banks[k], opts[k]
        for j, i in enumerate(range(0, n, batch_size)):
            b.grads(xp[i:i + batch_size], onehot[:, i:i + batch_size], drops[k])
            opt.step(t0 + j + 1)

    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads) if device.type == "cpu" and threads > 1 else None
    if pool is not None:  # banks in parallel, one core each: no per-op thread synchronisation
        torch.set_num_threads(1)
    try:
        while banks and rule.trains_on(done_passes):
            for _ in range(per_eval):
                perm = torch.randperm(n, generator=perm_gen).to(device)
                onehot = F.one_hot(y[perm], C).t().float()  # (C, n)
                xp = {li: X[li][perm] for li in {k[0] for k in banks}}  # the pass's order, once per layer
                order = sorted(banks, key=lambda k: -banks[k].R * banks[k].d)  # largest first
                if pool is None:
                    for k in order:
                        run_pass(k, xp[k[0]], onehot, t)
                else:
                    for f in [pool.submit(run_pass, k, xp[k[0]], onehot, t) for k in order]:
                        f.result()
                t += -(-n // batch_size)
            done_passes += per_eval
            if bar is not None:
                bar.update(per_eval * active)
            if not has_dev:
                continue
            stopped = {}
            scores = {k: b.score if pool is None else pool.submit(b.score, Xd[k[0]], yd, rule.metric, eval_batch)
                      for k, b in banks.items()}
            for k, b in banks.items():
                sc = scores[k](Xd[k[0]], yd, rule.metric, eval_batch) if pool is None else scores[k].result()
                for i, (u, s) in enumerate(zip(b.ids, sc)):
                    s = sign * s
                    if s > best[u] + rule.min_delta:
                        best[u] = s
                        if not rule.senteval:
                            bad[u] = 0  # consecutive; SentEval's count runs over the whole fit
                        if best_state[u] is None:
                            best_state[u] = state_of(b.pv[i], units[u].nhid)
                        else:  # into the unit's own copy: no new memory per improvement
                            for dst, src in zip(best_state[u].values(), b.pv[i]):
                                dst.copy_(src)
                    else:
                        stop, bad[u] = rule.stops(bad[u])
                        if stop:
                            stopped.setdefault(k, []).append(u)
                            passes[u] = done_passes
            if stopped:
                for k, gone in stopped.items():
                    b = banks.pop(k)
                    opts.pop(k)
                    keep = [i for i, u in enumerate(b.ids) if u not in gone]
                    if keep:
                        banks[k] = _Bank([b.ids[i] for i in keep], units, C, b.d,
                                         {b.ids[i]: (b.pv[i], b.mv[i], b.vv[i]) for i in keep}, device)
                        opts[k] = _Adam(banks[k], units, lr)
                n_gone = sum(len(v) for v in stopped.values())
                active -= n_gone
                if bar is not None:
                    bar.update((cap - done_passes) * n_gone)
            if bar is not None:
                bar.set_postfix(training=f"{active}/{len(units)}", refresh=False)
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)
    for b in banks.values():  # still training at max_passes (or no dev data): passes = all
        for i, u in enumerate(b.ids):
            passes[u] = done_passes
            if best_state[u] is None:
                best_state[u] = state_of(b.pv[i], units[u].nhid)
    if bar is not None:
        bar.close()
    return [{"state": best_state[u], "score": (sign * best[u]) if best[u] > -math.inf else None, "passes": passes[u]}
            for u in range(len(units))]
