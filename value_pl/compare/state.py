"""Leaving a model as it was found: the training state a probe run must not disturb (``compare`` and
``ProbeCallback``)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def preserved(*modules: nn.Module):
    """Restore every submodule's ``training`` flag, a backbone's frozen state (probing freezes it; a backbone the
    user trains is unfrozen) and every parameter's ``requires_grad`` on exit."""
    mods, params = {}, {}
    for m in modules:
        if m is None:
            continue
        for sub in m.modules():
            mods[id(sub)] = (sub, sub.training, sub.__dict__.get("_frozen", _ABSENT))
        for p in m.parameters():
            params[id(p)] = (p, p.requires_grad)
    try:
        yield
    finally:
        for sub, flag, frozen in mods.values():
            sub.training = flag  # set the flag itself: Module.train() may be overridden (frozen backbones)
            if frozen is _ABSENT:
                sub.__dict__.pop("_frozen", None)
            else:
                sub._frozen = frozen
        for p, flag in params.values():
            p.requires_grad_(flag)


_ABSENT = object()


@contextlib.contextmanager
def cpu_threads(n: int | None, device: torch.device):
    """Run with ``n`` intra-op CPU threads (restored after). Most of the suite's ops are small (heads,
    k-means): on a busy machine several OpenMP threads cost up to ~100x one thread on them, and the whole
    quick suite ran 3-4x faster on one thread than on two (2-core machine, load ~3); on an idle machine one
    thread costs ~25% (docs/compare.md, "Time per checkpoint")."""
    if not n or device.type != "cpu":
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)
