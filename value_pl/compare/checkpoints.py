"""Checkpoint discovery, training-step ordering and content checksums for ``python -m value_pl.compare``."""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..data.hashing import sha256_path
from ..data.safe_load import UnsafeCheckpointError, load_torch

#: name patterns, tried in order; the first that matches gives the step ("k" = thousands)
STEP_PATTERNS = [
    re.compile(r"(?<![a-z])(?:global_step|step|steps|iter|iteration|it)[=_\-]?(\d+)(k?)(?![\d])", re.I),
    re.compile(r"checkpoint[=_\-](\d+)(k?)(?![\d])", re.I),  # HF Trainer: checkpoint-5000
]
ANY_NUMBER = re.compile(r"(\d+)(k?)(?![\d])", re.I)
#: files in a checkpoint directory that do not change what the backbone computes
IGNORED_IN_DIR = {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}


@dataclass
class Checkpoint:
    path: str
    step: int | None
    step_source: str  # name | checkpoint | trainer_state | override | index
    is_dir: bool

    @property
    def name(self) -> str:
        return Path(self.path).name


def _num(m: re.Match) -> int:
    v = int(m.group(1))
    return v * 1000 if m.group(2) else v


def step_from_name(name: str) -> int | None:
    stem = re.sub(r"\.(pt|pth|bin|ckpt|safetensors)$", "", Path(name).name, flags=re.I)
    for pat in STEP_PATTERNS:
        ms = list(pat.finditer(stem))
        if ms:
            return _num(ms[-1])
    return None


def step_from_any_number(name: str) -> int | None:
    stem = re.sub(r"\.(pt|pth|bin|ckpt|safetensors)$", "", Path(name).name, flags=re.I)
    ms = list(ANY_NUMBER.finditer(stem))
    return _num(ms[-1]) if ms else None


def step_from_file(path: str) -> int | None:
    """``global_step`` / ``step`` stored in a torch checkpoint dict (memory-mapped: cheap for big files).

    Read with ``weights_only=True`` like every torch file: a file that needs pickle raises
    :class:`~value_pl.data.safe_load.UnsafeCheckpointError` (unless ``allow_unsafe_checkpoints=true``);
    a file that is not a torch file has no stored step (None).
    """
    try:
        obj = load_torch(path, what="checkpoint", mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception:  # noqa: BLE001 - not a torch file, truncated, ...: the step comes from elsewhere
        obj = None
    if isinstance(obj, dict):
        for k in ("global_step", "step", "iteration"):
            v = obj.get(k)
            if isinstance(v, (int, float)) or (hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1):
                return int(v)
    return None


def step_from_dir(path: str) -> int | None:
    ts = Path(path) / "trainer_state.json"
    if ts.exists():
        try:
            return int(json.loads(ts.read_text())["global_step"])
        except Exception:  # noqa: BLE001
            return None
    return None


def expand(spec) -> list[str]:
    """A glob, a comma-separated string, or a list of paths/globs -> existing paths (each glob sorted)."""
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for it in items:
        for part in str(it).split(","):
            part = os.path.expanduser(part.strip())
            if not part:
                continue
            hits = sorted(glob.glob(part)) if glob.has_magic(part) else ([part] if Path(part).exists() else [])
            if not hits:
                raise FileNotFoundError(f"checkpoints: nothing matches {part!r}")
            out.extend(hits)
    seen, uniq = set(), []
    for p in out:
        r = str(Path(p).resolve())
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


def discover(spec, steps=None) -> list[Checkpoint]:
    """Checkpoints ordered by training step (``steps``: explicit steps, in the order of ``spec``)."""
    paths = expand(spec)
    if not paths:
        raise FileNotFoundError("checkpoints=... matched no file or directory")
    if steps is not None:
        steps = [int(s) for s in steps]
        if len(steps) != len(paths):
            raise ValueError(f"steps has {len(steps)} entries for {len(paths)} checkpoints ({paths})")
    out = []
    for i, p in enumerate(paths):
        is_dir = Path(p).is_dir()
        if steps is not None:
            step, src = steps[i], "override"
        else:
            step, src = step_from_name(p), "name"
            if step is None:
                step, src = (step_from_dir(p), "trainer_state") if is_dir else (step_from_file(p), "checkpoint")
            if step is None:
                step, src = step_from_any_number(p), "name"
            if step is None:
                step, src = i, "index"
        out.append(Checkpoint(p, step, src, is_dir))
    out.sort(key=lambda c: (c.step, c.path))
    return out


def checksum(path: str) -> str:
    """sha256 of a checkpoint's bytes; for a directory, of every file's relative path and bytes
    (training-only files such as the optimizer state excluded)."""
    return sha256_path(path, ignore=IGNORED_IN_DIR)
