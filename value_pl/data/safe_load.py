"""How value-pl reads torch files (backbone weights, prober checkpoints, checkpoints under comparison).

Every torch file is read with ``torch.load(weights_only=True)``: tensors, plain containers and numbers only,
so a file from elsewhere cannot run code when it is read. A file that needs pickle to load (it names
classes or functions to call) is refused with :class:`UnsafeCheckpointError`, naming the file and the switch
``allow_unsafe_checkpoints=true`` (``configs/train.yaml``, ``eval.yaml``, ``extract.yaml``, ``analyze.yaml``,
``compare.yaml``). With the switch on, such a file is loaded with pickle after a warning naming it.

The drivers wrap their work in :func:`honours_switch`, which reads the switch from the run's config and
sets it for everything loaded during the call (the backbone builders call :func:`load_torch` without
knowing the run's config). Other formats never involve pickle: safetensors, JSON, and ``.npy``/``.npz``
with ``allow_pickle=False``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import pickle
import re
import warnings
import zipfile
from pathlib import Path

SWITCH = "allow_unsafe_checkpoints"

log = logging.getLogger("value_pl")

_ALLOW = contextvars.ContextVar("value_pl_allow_unsafe_checkpoints", default=False)


class UnsafeCheckpointError(RuntimeError):
    """A torch file that only loads with pickle (which can run arbitrary code), read without the switch."""


class UnsafeLoadWarning(UserWarning):
    """A torch file is being loaded with pickle because ``allow_unsafe_checkpoints=true``."""


def unsafe_allowed() -> bool:
    return _ALLOW.get()


@contextlib.contextmanager
def checkpoint_policy(allow_unsafe: bool):
    """Within the block, :func:`load_torch` falls back to pickle (with a warning) iff ``allow_unsafe``."""
    token = _ALLOW.set(bool(allow_unsafe))
    try:
        yield
    finally:
        _ALLOW.reset(token)


def honours_switch(fn):
    """Decorate a driver ``fn(cfg, ...)``: its loads follow ``cfg.allow_unsafe_checkpoints`` (default false)."""

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        allow = bool(cfg.get(SWITCH, False)) if hasattr(cfg, "get") else False
        with checkpoint_policy(allow):
            return fn(cfg, *args, **kwargs)

    return wrapper


def _unsafe_names(path, err: Exception) -> list[str]:
    names: list[str] = []
    try:
        import torch

        if zipfile.is_zipfile(path):
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only for the message
        names = []
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
    return sorted(set(names))


def refusal(path, what: str, names: list[str]) -> str:
    held = f" (it references {', '.join(names[:6])}{' ...' if len(names) > 6 else ''})" if names else ""
    return (f"{path}: refusing to load this {what}: it needs pickle to load{held}, and unpickling can run "
            f"arbitrary code; if you trust where the file comes from, rerun with {SWITCH}=true")


def can_mmap(path) -> bool:
    """Whether ``torch.load(mmap=True)`` can map ``path``: files in the zip format ``torch.save`` writes by default
    since torch 1.6 (``mmap`` itself is in every torch value-pl supports, >= 2.1, with ``weights_only`` too); a
    legacy-format file is read whole instead."""
    return zipfile.is_zipfile(path)


def load_torch(path, *, what: str = "checkpoint", mmap: bool = False, allow_unsafe: bool | None = None):
    """``torch.load(path, weights_only=True)`` on the CPU; a file that needs pickle raises
    :class:`UnsafeCheckpointError` unless unsafe loading is allowed (argument, else the run's switch).

    ``mmap=True``: the tensors stay in the file, mapped; only the pages of the tensors that are read are ever in
    memory (a Lightning checkpoint's optimizer moments, twice the weights with Adam, are never read when only the
    weights are copied out). Copy what is kept: a mapped tensor keeps the whole file mapped. A legacy-format file
    is read whole (:func:`can_mmap`; callers that read more than a few numbers say so)."""
    import torch

    path = str(path)
    allow = unsafe_allowed() if allow_unsafe is None else bool(allow_unsafe)
    mmap = bool(mmap) and can_mmap(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower() and "weightsunpickler" not in str(e).lower():
            raise
        names = _unsafe_names(path, e)
        m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        reason = m.group(1).strip() if m else str(e).strip().splitlines()[0]
    if not allow:
        if not names:  # no class or function named: a damaged or non-torch file rather than a pickled payload
            raise ValueError(f"{path}: not a {what} that loads with weights_only=True ({reason}); if it is a file "
                             f"you trust that needs pickle, rerun with {SWITCH}=true")
        raise UnsafeCheckpointError(refusal(path, what, names))
    msg = (f"{path}: loading this {what} with pickle because {SWITCH}=true"
           + (f" (it references {', '.join(names[:6])})" if names else "")
           + "; unpickling runs whatever code the file holds")
    warnings.warn(msg, UnsafeLoadWarning, stacklevel=2)
    log.warning(msg)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def check_loadable(path, what: str = "checkpoint") -> None:
    """Raise :class:`UnsafeCheckpointError` now (before a library loads ``path`` itself) if it needs pickle
    and the switch is off; warn if it needs pickle and the switch is on."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    load_torch(path, what=what, mmap=True)
