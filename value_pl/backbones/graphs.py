"""CUDA graphs of a frozen backbone's forward: the forward's ~600-900 kernels replayed with one launch.

On a GPU a probe step is bound by the host time it takes to launch its kernels (docs/performance.md: an H200
finishes a UNITER-base forward's kernels faster than Python issues them). A CUDA graph records the kernels of one
forward once and replays them with one call, so the frozen forward's host time is a few copies and a replay.

A graph replays fixed shapes on fixed memory. :class:`GraphedForward` therefore

* pads each forward input (the collator's ``input_ids``, ``text_mask``, ``special_mask``, ``region_feats``,
  ``region_boxes``, ``region_mask``) and each modality's requested attention rows along its variable dimension up
  to a *bucket* (a multiple), into static buffers: padding tokens and regions are masked (mask 0), padding rows are
  ``-1``; the real positions' outputs are what the unpadded forward computes, up to the rounding of kernels that
  see a longer sequence (``tests/test_graphs.py``). ``word_to_token``, which a forward only hands on, is the
  batch's own;
* keeps one graph per distinct padded shape and capture request (and autocast dtype; one graph serves inference
  mode and training alike: its buffers are normal tensors), up to ``max_graphs``; a batch past that, a forward
  with grad enabled, or a backbone that is not frozen runs eagerly (counted in :meth:`GraphedForward.stats`);
* returns the :class:`~value_pl.backbones.base.BackboneOutput` over the *padded* inputs, with the
  :class:`~value_pl.backbones.capture.CaptureSpec` whose rows are the padded ones: consumers that read only these
  two (the probers, :mod:`value_pl.probers.features`) need nothing else. The output's tensors are the graph's
  static memory: the next call overwrites them, so consume (or copy) them first;
* rebuilds its graphs when the backbone's weights change (another device, weights loaded, trained or replaced):
  a graph reads the memory it was recorded with; it also keeps the autocast weight copies it read
  (:mod:`.autocast_cache`) alive;
* never pads text past the backbone's position embeddings (``position_limit``);
* checks the recording and the first refilled replay of every graph against the plain forward on the same
  (padded) inputs (``verify``, 2 calls per graph); a difference turns graphs off with a warning naming the output
  that differs, and the run goes on eagerly: a graph that reads the wrong memory is caught before its first two
  answers are used (``tests/test_graphs.py`` replays two shapes alternately with every call checked, on a GPU).

A capture that fails (an operator that cannot be recorded) logs a warning with the error once and turns the
wrapper off: the run goes on eagerly. ``engine`` is the recorder: :class:`CudaGraphs` on CUDA; tests on a CPU use
:class:`Rerun`, which reruns the forward on the static buffers instead of replaying a graph.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import fields, is_dataclass, replace

import torch
from torch import Tensor

from .capture import CaptureSpec

log = logging.getLogger(__name__)

#: forward inputs of the collator's batch: field -> (bucket group of its dim 1, padding value)
INPUTS = {
    "input_ids": ("text", 0), "text_mask": ("text", 0), "special_mask": ("text", 0),
    "region_feats": ("regions", 0), "region_boxes": ("regions", 0), "region_mask": ("regions", 0),
}
#: read by the forward only to be handed on in its output: not recorded, the batch's own tensor is returned
PASS_THROUGH = ("word_to_token",)
DEFAULT_MULTIPLES = {"text": 8, "regions": 4, "rows": 4}


def bucket(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (``n`` itself for ``multiple <= 1``; 0 stays 0)."""
    if multiple <= 1 or n == 0:
        return n
    return -(-n // multiple) * multiple


def named_tensors(obj, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor of a forward's output with its path (``hidden[hidden.joint.3]``), in a fixed order (dataclass
    fields, dict items, list/tuple items)."""
    out: list[tuple[str, Tensor]] = []

    def walk(x, name):
        if isinstance(x, Tensor):
            out.append((name, x))
        elif is_dataclass(x) and not isinstance(x, type):
            for f in fields(x):
                walk(getattr(x, f.name), f"{name}.{f.name}" if name else f.name)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}[{k}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}[{i}]")

    walk(obj, prefix)
    return out


def output_tensors(obj) -> list[Tensor]:
    """Every tensor of a forward's output, in :func:`named_tensors`' order."""
    return [t for _, t in named_tensors(obj)]


def mismatch(got, ref, rtol: float = 1e-2, atol: float = 1e-2) -> str | None:
    """Where two outputs of the same structure differ (floats beyond ``rtol``/``atol``, anything else at all):
    a description of the first difference, or None."""
    a, b = named_tensors(got), named_tensors(ref)
    if [(n, t.shape) for n, t in a] != [(n, t.shape) for n, t in b]:
        return "the outputs differ in structure or shapes"
    for (name, x), (_, y) in zip(a, b):
        if x.is_floating_point():
            x, y = x.float(), y.float()
            if not torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True).all():
                return f"{name}: max abs difference {(x - y).abs().nan_to_num(float('inf')).max().item():.3g}"
        elif not torch.equal(x, y):
            return f"{name}: values differ"
    return None


_REGISTRATIONS = [0]  # parameters registered on any module since the first GraphedForward (a global hook counts)
_HOOK = None


def _count_registration(module, name, param):
    _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    global _HOOK
    if _HOOK is None:
        _HOOK = torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


class CudaGraphs:
    """Records ``fn`` as a CUDA graph (after warm-up calls on a side stream, as torch's CUDA-graph recipe asks:
    lazy initialisation, the autocast weight copies and cuBLAS workspaces happen outside the capture). All graphs
    of one engine share a memory pool: every graph's outputs stay allocated, so graphs may replay in any order
    as long as each replay's outputs are consumed before the next replay."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.pool = None

    def capture(self, fn, device=None):
        with torch.cuda.device(device):
            return self._capture(fn)

    def _capture(self, fn):
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        current.wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pin-memory thread may call CUDA during a capture (pinning the next batch)
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn()
        finally:  # a failed capture leaves the capture stream current (torch.cuda.graph.__exit__ raises first)
            torch.cuda.set_stream(current)
        graph.replay()  # the capture only recorded: this computes the first batch's outputs
        return out, graph.replay


class Rerun:
    """What a graph means, without a GPU: ``replay`` reruns ``fn`` on the static inputs and copies the results into
    the first call's output tensors, so callers see the same objects refilled, as with a graph."""

    def capture(self, fn, device=None):
        out = fn()
        static = output_tensors(out)

        def replay():
            new = output_tensors(fn())
            if len(new) != len(static):
                raise RuntimeError("a rerun returned a different output structure")
            for a, b in zip(static, new):
                a.copy_(b)

        return out, replay


class _Entry:
    __slots__ = ("inputs", "rows", "spec", "out", "replay", "calls", "keep")

    def __init__(self, inputs, rows, spec):
        self.inputs, self.rows, self.spec = inputs, rows, spec
        self.out = self.replay = None
        self.calls = 0
        self.keep = ()  # the autocast weight copies the recording read: alive as long as the graph


class GraphedForward:
    """A frozen backbone's forward, replayed from CUDA graphs of bucketed input shapes (see the module's doc).

    Call it as ``out, spec = graphed(batch, spec)`` with the batch on the backbone's device."""

    def __init__(self, backbone, multiples: dict | None = None, max_graphs: int = 8, verify: int = 2, engine=None):
        self.backbone = backbone
        self.verify = int(verify)
        unknown = sorted(set(multiples or {}) - set(DEFAULT_MULTIPLES))
        if unknown:
            raise ValueError(f"cuda_graphs.multiples: unknown {unknown}; known: {sorted(DEFAULT_MULTIPLES)}")
        self.multiples = {**DEFAULT_MULTIPLES, **{k: int(v) for k, v in (multiples or {}).items()}}
        self.max_graphs = int(max_graphs)
        self.engine = engine
        self.graphs: dict[tuple, _Entry] = {}
        self.eager = Counter()  # why calls ran eagerly
        self.replays = 0
        self.disabled: str | None = None
        self._weights: tuple | None = None
        self._params: list | None = None
        self._registrations = -1
        _watch_registrations()

    # ----------------------------------------------------------------- state
    def stats(self) -> dict:
        """``graphs`` recorded now, ``replays`` (calls answered by a graph), ``eager`` (calls run plainly, by reason),
        ``disabled`` (why graphs were turned off, or None)."""
        return {"graphs": len(self.graphs), "replays": self.replays, "eager": dict(self.eager),
                "disabled": self.disabled}

    def reset(self) -> None:
        """Drop every graph (their memory is freed when nothing else holds their outputs)."""
        self.graphs.clear()
        if isinstance(self.engine, CudaGraphs):
            self.engine.pool = None

    def _engine_for(self, device: torch.device):
        if self.engine is not None:
            return self.engine
        if device.type == "cuda":
            self.engine = CudaGraphs()
            return self.engine
        return None

    def _weights_key(self) -> tuple:
        """What the graphs' weights are: every parameter's memory and version (moved, loaded or trained in place),
        and the parameters themselves (replaced, e.g. ``load_state_dict(assign=True)``: any parameter registered
        anywhere since the last call makes the list be read again)."""
        if self._params is None or self._registrations != _REGISTRATIONS[0]:
            self._params = list(self.backbone.parameters())
            self._registrations = _REGISTRATIONS[0]
        return tuple((id(p), p.data_ptr(), p._version) for p in self._params)

    def _eager(self, why: str, batch: dict, spec: CaptureSpec):
        self.eager[why] += 1
        return self.backbone(batch, spec), spec

    # ------------------------------------------------------------------ call
    def __call__(self, batch: dict, spec: CaptureSpec):
        dev = batch["input_ids"].device
        if self.disabled:
            return self._eager("disabled", batch, spec)
        engine = self._engine_for(dev)
        if engine is None:
            return self._eager("not on a CUDA device", batch, spec)
        if torch.is_grad_enabled():
            return self._eager("grad enabled", batch, spec)
        if not getattr(self.backbone, "_frozen", False) or self.backbone.training:
            return self._eager("backbone not frozen", batch, spec)
        weights = self._weights_key()
        if weights != self._weights:  # moved, loaded or trained: recorded graphs read stale memory
            if self._weights is not None:
                self.reset()
            self._weights = weights
        shapes = self._shapes(batch, spec)
        ac = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        key = (shapes, None if spec.hidden is None else tuple(spec.hidden),
               None if spec.attn is None else tuple(spec.attn), spec.full_forward, ac, str(dev))
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                if not self.eager["over max_graphs"]:
                    log.info("cuda graphs: %d recorded (max_graphs); further shapes run eagerly", self.max_graphs)
                return self._eager("over max_graphs", batch, spec)
            entry = self._static(batch, spec, shapes, dev)
            self._fill(entry, batch, spec)
            try:
                # normal tensors, also under inference mode: one graph serves training and validation alike
                with torch.inference_mode(False), torch.no_grad():
                    entry.out, entry.replay = engine.capture(lambda: self.backbone(entry.inputs, entry.spec), dev)
                # a module's cast copies can be dropped or replaced (.to(), another autocast dtype): keep the read ones
                entry.keep = tuple(getattr(m, "_autocast_copy", None) for m in self.backbone.modules()
                                   if getattr(m, "_autocast_copy", None) is not None)
            except Exception as e:  # noqa: BLE001 -- an unrecordable forward is slower, not wrong
                self.disabled = f"{type(e).__name__}: {e}"
                self.reset()
                log.warning("cuda graphs: the frozen forward could not be recorded (%s); running it eagerly",
                            self.disabled)
                return self._eager("capture failed", batch, spec)
            self.graphs[key] = entry
        else:
            self._fill(entry, batch, spec)
            entry.replay()
        if entry.calls < self.verify:  # the recording and the first refilled replay, against the plain forward
            bad = mismatch(entry.out, self.backbone(entry.inputs, entry.spec))
            if bad is not None:
                self.disabled = f"a replay differs from the plain forward on the same inputs: {bad}"
                self.reset()
                log.warning("cuda graphs: %s; running the frozen forward eagerly", self.disabled)
                return self._eager("verification failed", batch, spec)
        entry.calls += 1
        self.replays += 1
        return replace(entry.out, **{k: batch[k] for k in PASS_THROUGH if k in batch}), entry.spec

    # -------------------------------------------------------------- buffers
    def _length(self, group: str, n: int) -> int:
        b = bucket(n, self.multiples[group])
        if group == "text" and b > n:  # never past the position embeddings (a padded position must exist)
            limit = getattr(self.backbone, "position_limit", None)
            if isinstance(limit, int):
                b = max(n, min(b, limit))
        return b

    def _shapes(self, batch: dict, spec: CaptureSpec) -> tuple:
        ins = tuple((k, (x.shape[0], self._length(INPUTS[k][0], x.shape[1]), *x.shape[2:]), x.dtype)
                    for k, x in ((k, batch.get(k)) for k in INPUTS) if isinstance(x, Tensor))
        rows = None if spec.rows is None else tuple(
            (mod, (r.shape[0], self._length("rows", r.shape[1])), r.dtype) for mod, r in spec.rows.items())
        return ins, rows

    def _static(self, batch: dict, spec: CaptureSpec, shapes: tuple, dev) -> _Entry:
        with torch.inference_mode(False):  # refilled in place under either mode (Lightning validates in inference mode)
            return self._buffers(batch, spec, shapes, dev)

    def _buffers(self, batch: dict, spec: CaptureSpec, shapes: tuple, dev) -> _Entry:
        ins, rows = shapes
        inputs = {k: torch.empty(shape, dtype=dt, device=dev) for k, shape, dt in ins}
        # the recording sees the batch's own pass-through tensors; every answer carries its batch's
        inputs.update({k: batch[k] for k in PASS_THROUGH if k in batch})
        static_rows = None if rows is None else {mod: torch.empty(shape, dtype=dt, device=dev)
                                                 for mod, shape, dt in rows}
        return _Entry(inputs, static_rows, replace(spec, rows=static_rows))

    def _fill(self, entry: _Entry, batch: dict, spec: CaptureSpec) -> None:
        for k, buf in entry.inputs.items():
            if k in INPUTS:
                _put(buf, batch[k], INPUTS[k][1])
        if entry.rows is not None:
            for mod, buf in entry.rows.items():
                _put(buf, spec.rows[mod], -1)


def _put(buf: Tensor, x: Tensor, pad) -> None:
    """``x`` into the leading part of ``buf`` along dim 1, ``pad`` after it."""
    n = x.shape[1]
    if n == buf.shape[1]:
        buf.copy_(x, non_blocking=True)
        return
    buf[:, :n].copy_(x, non_blocking=True)
    buf[:, n:].fill_(pad)
