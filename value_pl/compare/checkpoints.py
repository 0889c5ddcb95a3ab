"""Checkpoint discovery, training-step ordering and content checksums for ``python -m value_pl.compare``."""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
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
    step_source: str  # name | link_target | dir_name | checkpoint | trainer_state | override | index
    is_dir: bool
    #: :func:`signature` when the checkpoint was listed: the bytes its step was read from
    signature: tuple | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return Path(self.path).name


def _num(m: re.Match) -> int:
    v = int(m.group(1))
    return v * 1000 if m.group(2) else v


def signature(path: str) -> tuple:
    """What changes when a checkpoint is written or replaced: size, mtime and inode of the file, or of every file
    of a directory (training-only files excluded). Raises FileNotFoundError when it is gone."""
    p = Path(path)
    if not p.is_dir():
        st = os.stat(p)  # follows a symlink: the target's bytes are what is read
        return (st.st_size, st.st_mtime_ns, st.st_ino)
    return tuple((str(f.relative_to(p)), *signature(str(f)))
                 for f in sorted(p.rglob("*")) if f.is_file() and f.name not in IGNORED_IN_DIR)


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
    """A glob, a comma-separated string, or a list of paths/globs -> existing paths (each glob sorted), in the
    order given. Names that point at the same file (a symlink such as ``latest.pt`` or Lightning's
    ``last.ckpt``, a path listed twice) are all kept: :func:`discover` chooses which name to compare."""
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
    return out


#: how far a step source is trusted when several names point at one file (lower = kept)
_TRUST = {"override": 0, "name": 0, "link_target": 1, "dir_name": 1, "checkpoint": 2, "trainer_state": 2,
          "number": 3, "index": 4}


def _dir_owners(paths: list[str]) -> dict[str, set[str]]:
    """directory -> the distinct checkpoint files (resolved) under it, one or two levels down."""
    owners: dict[str, set[str]] = {}
    for p in paths:
        real = os.path.realpath(p)
        for q in (os.path.abspath(p), real):
            parent = os.path.dirname(q)
            for d in (parent, os.path.dirname(parent)):
                owners.setdefault(d, set()).add(real)
    return owners


def _find_step(p: str, owners: dict[str, set[str]]) -> tuple[int | None, str]:
    """The step of one checkpoint name and where it came from (see :func:`discover`)."""
    step = step_from_name(p)
    if step is not None:
        return step, "name"
    real = os.path.realpath(p)
    if Path(real).name != Path(p).name:  # a symlink: its target's name (latest.pt -> model_step2000.pt)
        step = step_from_name(real)
        if step is not None:
            return step, "link_target"
    given, resolved = os.path.abspath(p), real

    def dir_step(level: int) -> int | None:
        # a directory's name counts only when this checkpoint is the only one under it
        # (run/checkpoint-500/pytorch_model.bin; not exp_step3/ckpts/{last.pt,step1000.pt})
        for q in dict.fromkeys((given, resolved)):
            d = q
            for _ in range(level):
                d = os.path.dirname(d)
            if len(owners.get(d, ())) == 1:
                s = step_from_name(d)
                if s is not None:
                    return s
        return None

    if Path(p).is_dir():
        step = step_from_dir(p)
        if step is not None:
            return step, "trainer_state"
    else:
        step = step_from_file(p)
        if step is not None:
            return step, "checkpoint"
    step = dir_step(1)
    if step is not None:
        return step, "dir_name"
    parent = os.path.dirname(given)
    if not Path(p).is_dir() and len(owners.get(parent, ())) == 1:
        step = step_from_dir(parent)  # HF layout: checkpoint-500/trainer_state.json next to the weights
        if step is not None:
            return step, "trainer_state"
    step = dir_step(2)
    if step is not None:
        return step, "dir_name"
    step = step_from_any_number(p)
    if step is not None:
        return step, "number"
    return None, "index"


def _say(msg: str) -> None:
    print(f"[value-pl] checkpoints: {msg}", flush=True)


def discover(spec, steps=None) -> list[Checkpoint]:
    """Checkpoints ordered by training step.

    The step of each name comes from, in order: the name (``step1000``, ``checkpoint-5000`` ...); a
    symlink's target name; the step stored in the checkpoint (``global_step`` of a torch dict, a
    directory's ``trainer_state.json``); the parent directory's name (``checkpoint-500/pytorch_model.bin``)
    or its ``trainer_state.json``; the grandparent directory's name; the last number in the name. A directory's name is only used for a checkpoint that
    is alone under that directory. Names that point at the same file (``latest.pt``, ``last.ckpt``
    symlinks) are compared once, under the name that carries the step; the dropped names are printed.
    A checkpoint with no step at all, among checkpoints with steps, is an error (set ``steps``); when no
    checkpoint has a step, the steps are the list positions (printed). A checkpoint with no step that changes
    while it is read is being written: it is left out (printed), for the next run.

    ``steps``: explicit steps in the order of ``spec``, one per name, or one per distinct file.
    """
    names = expand(spec)
    if not names:
        raise FileNotFoundError("checkpoints=... matched no file or directory")
    return _listed(names, steps)


def _listed(names: list[str], steps=None) -> list[Checkpoint]:
    """:func:`discover` on existing paths."""
    sigs = {p: signature(p) for p in names}  # before any step is read from the files
    groups: dict[str, list[int]] = {}  # resolved file -> indices into names, in the order given
    for i, p in enumerate(names):
        groups.setdefault(os.path.realpath(p), []).append(i)
    found: list[tuple[int | None, str]]
    if steps is not None:
        steps = [int(s) for s in steps]
        if len(steps) == len(names):
            found = [(s, "override") for s in steps]
        elif len(steps) == len(groups):
            per_file = dict(zip(groups, steps))
            found = [(per_file[os.path.realpath(p)], "override") for p in names]
        else:
            n = (f"{len(names)} names, {len(groups)} distinct files" if len(groups) != len(names)
                 else f"{len(names)} checkpoints")
            raise ValueError(f"steps has {len(steps)} entries for {n} ({names})")
    else:
        owners = _dir_owners(names)
        found = [_find_step(p, owners) for p in names]
        # a file with no step that changed while it was read is being written (a save in progress): it is left out
        # (said) rather than failing the run as a checkpoint without a step; the next run lists it
        writing = [p for p, (st, _) in zip(names, found) if st is None and _moved(p, sigs[p])]
        if writing:
            _say(f"being written, left out (a re-run compares it): {', '.join(writing)}")
            rest = [p for p in names if p not in writing]
            if not rest:
                raise FileNotFoundError(f"checkpoints: every match is still being written ({', '.join(writing)})")
            return _listed(rest)

    kept: list[int] = []
    for real, idx in groups.items():
        # prefer the name whose step is best founded, then the real file over a symlink, then the first given
        best = min(idx, key=lambda i: (_TRUST[found[i][1]], os.path.islink(names[i]), i))
        kept.append(best)
        others = [i for i in idx if i != best]
        if not others:
            continue
        clash = sorted({found[i][0] for i in idx if found[i][1] in ("override", "name") and found[i][0] is not None})
        if steps is not None and len(clash) > 1:
            raise ValueError(f"steps gives one file two steps {clash}: {', '.join(names[i] for i in idx)} are "
                             f"the same file ({real})")
        step = found[best][0]
        _say(f"one file, several names: kept {names[best]}{f' (step {step})' if step is not None else ''}, "
             f"dropped {', '.join(names[i] + (' (listed again)' if names[i] == names[best] else '') for i in others)}"
             + (f" (the names disagree on the step: {clash})" if len(clash) > 1 else ""))
    # one file order everywhere -- a file's first appearance in the list: steps given per file, the order the
    # error below asks for them in, and list positions all follow it (a symlink that sorts before its target
    # puts the target there)

    missing = [i for i in kept if found[i][0] is None]
    if missing and len(missing) < len(kept):
        order = ", ".join(Path(names[i]).name for i in kept)
        raise ValueError(
            "checkpoints: no training step found for "
            + ", ".join(names[i] for i in missing)
            + " (not in the name, its directory's name or the file), while the other checkpoints have steps; "
            f"their list position would be mixed with real steps. Set every step with steps=[...], one per "
            f"checkpoint in this order: {order} -- or leave these out of checkpoints=...")
    if missing:
        _say("no training step in any name, directory or file: the steps are the list positions "
             f"0..{len(kept) - 1} in the order given ({', '.join(Path(names[i]).name for i in kept)}); "
             "set steps=[...] for the real ones")
    out = []
    for pos, i in enumerate(kept):
        step, src = found[i]
        if step is None:
            step = pos
        out.append(Checkpoint(names[i], step, "name" if src == "number" else src, Path(names[i]).is_dir(),
                              sigs[names[i]]))
    out.sort(key=lambda c: (c.step, c.path))
    return out


def _moved(path: str, sig: tuple) -> bool:
    try:
        return signature(path) != sig
    except FileNotFoundError:
        return True


def changed(ck: Checkpoint) -> str | None:
    """Why ``ck`` is no longer the checkpoint :func:`discover` listed (still being written, replaced by a newer save,
    deleted by a save_top_k rotation), or None when it is unchanged."""
    try:
        now = signature(ck.path)
    except FileNotFoundError:
        return "removed since it was listed"
    if ck.signature is not None and now != ck.signature:
        return "changed since it was listed (still being written, or replaced by a newer save)"
    return None


def checksum(path: str) -> str:
    """sha256 of a checkpoint's bytes; for a directory, of every file's relative path and bytes
    (training-only files such as the optimizer state excluded)."""
    return sha256_path(path, ignore=IGNORED_IN_DIR)
