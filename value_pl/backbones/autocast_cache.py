"""Frozen Linear weights cast once for autocast, not on every call.

Under ``torch.autocast`` a Linear's float32 weight and bias are cast to the autocast dtype on *every* call, unless
they require grad (autocast caches only those). A frozen backbone's do not, so a UNITER-base forward under bf16
autocast spends 148 of its ~700 operators (on a GPU: kernels, each with its host-side launch cost) re-making the
same bf16 copies. :class:`AutocastCachedLinear` keeps the copy per autocast dtype and reuses it while the weight is
unchanged (same storage, same version counter): results are bit-for-bit those of plain autocast (the cast is the
same rounding), outside autocast the float32 weights are used as before, and the checkpoint keys are untouched.
It costs the low-precision copies' memory (half of the Linear weights' float32 size) once autocast has been used;
moving the module (``.to()``) or training its weights again drops them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AutocastCachedLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen float32 weight and bias are cast for autocast once (see the module's doc)."""

    _autocast_copy: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        dev = x.device.type
        if w.requires_grad or w.dtype != torch.float32 or not torch.is_autocast_enabled(dev) or w.is_inference():
            if w.requires_grad and self._autocast_copy is not None:
                self._autocast_copy = None  # being trained again (the probe callback's model): no stale copy kept
            return F.linear(x, w, b)
        dt = torch.get_autocast_dtype(dev)
        key = (dt, w.device, w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        c = self._autocast_copy
        if c is None or c[0] != key:
            # normal tensors also when first made under inference_mode (Lightning's validation sanity check): an
            # inference tensor could not be saved for a later backward to the inputs (e.g. input saliency)
            with torch.no_grad(), torch.inference_mode(False):
                c = (key, w.to(dt), None if b is None else b.to(dt))
            self._autocast_copy = c
        return F.linear(x, c[1], c[2])

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the copies would be stale, free them now
        self._autocast_copy = None
        return super()._apply(fn, recurse)


def cache_autocast_weights(module: nn.Module) -> int:
    """Make every plain ``nn.Linear`` in ``module`` an :class:`AutocastCachedLinear` (same parameters, same keys;
    the class only changes how autocast treats its frozen weights). Returns how many were converted."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = AutocastCachedLinear
            n += 1
    return n


def uncache_autocast_weights(module: nn.Module) -> int:
    """Undo :func:`cache_autocast_weights` (plain ``nn.Linear`` again, copies dropped): the reference benchmarks
    and tests compare against. Returns how many were reverted."""
    n = 0
    for m in module.modules():
        if type(m) is AutocastCachedLinear:
            m.__class__ = nn.Linear
            m.__dict__.pop("_autocast_copy", None)
            n += 1
    return n
