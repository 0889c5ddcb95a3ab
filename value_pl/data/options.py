"""Range checks of config values, shared by every entry point: a value out of its range stops the run at start
with a message naming the key (``prober.lr=-0.1: must be > 0``), instead of a crash deep in a model, a silent
clamp, or a run that quietly does something else (``max_samples=0`` reading the whole split).

The checks take a Hydra/OmegaConf config or a plain dict and dotted keys; a key absent from the config is
skipped (optional keys), a missing value (``???``) is left to whoever reads it.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from typing import Any

_ABSENT = object()


class OptionError(ValueError):
    """A config value out of its range, or a combination of options that cannot run together."""


def value(cfg, key: str, default: Any = _ABSENT) -> Any:
    """``cfg``'s value at the dotted ``key`` (plain containers for sub-configs); ``default`` when absent."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        DictConfig = ListConfig = OmegaConf = None
    if OmegaConf is not None and isinstance(cfg, DictConfig):
        v = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if v is _ABSENT:
            return default
        if isinstance(v, (DictConfig, ListConfig)):
            try:
                return OmegaConf.to_container(v, resolve=True)
            except Exception:  # noqa: BLE001 - an interpolation to a value not given yet (???): left to its reader
                return OmegaConf.to_container(v, resolve=False)
        return v
    cur = cfg
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(cfg, key: str, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False, null: bool = False, why: str = "") -> None:
    """``key`` is a number in ``[lo, hi]`` (``lo_open``/``hi_open``: the bound excluded); ``null`` allows None."""
    v = value(cfg, key)
    if v is _ABSENT or v == "???":
        return
    if v is None:
        if null:
            return
        raise OptionError(f"{key}=null: must be {_range(lo, hi, lo_open, hi_open, integer)}{why}")
    ok = is_number(v) and (not integer or float(v).is_integer())
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        raise OptionError(f"{key}={v!r}: must be {_range(lo, hi, lo_open, hi_open, integer)}"
                          f"{' or null' if null else ''}{why}")


def _range(lo, hi, lo_open, hi_open, integer) -> str:
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind


def choice(cfg, key: str, choices: Iterable, *, null: bool = False, why: str = "") -> None:
    """``key`` is one of ``choices`` (``null``: or None)."""
    v = value(cfg, key)
    choices = list(choices)
    if v is _ABSENT or v == "???" or (v is None and null) or v in choices:
        return
    raise OptionError(f"{key}={v!r}: must be one of {', '.join(map(str, choices))}{' or null' if null else ''}{why}")


def flag(cfg, key: str, *, null: bool = False) -> None:
    """``key`` is true or false (``null``: or None, the automatic choice)."""
    v = value(cfg, key)
    if v is _ABSENT or isinstance(v, bool) or (v is None and null):
        return
    raise OptionError(f"{key}={v!r}: must be true or false{' (or null: automatic)' if null else ''}")


def numbers(cfg, key: str, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False,
            integer: bool = False, nonempty: bool = True, null: bool = False, why: str = "") -> None:
    """``key`` is a list whose every item is a number in range (``null``: or None)."""
    v = value(cfg, key)
    if v is _ABSENT or v == "???" or (v is None and null):
        return
    if not isinstance(v, (list, tuple)) or (nonempty and not v):
        raise OptionError(f"{key}={v!r}: must be a{' non-empty' if nonempty else ''} list of "
                          f"{_range(lo, hi, lo_open, hi_open, integer).replace('a number', 'numbers').replace('an integer', 'integers')}"
                          f"{why}")
    for i, x in enumerate(v):
        try:
            number({"x": x}, "x", lo, hi, lo_open=lo_open, hi_open=hi_open, integer=integer, why=why)
        except OptionError as e:
            raise OptionError(f"{key}={v!r}: item {i} ({x!r}) {str(e).split(': ', 1)[1]}") from None


def known_keys(cfg: dict, known: Iterable[str], what: str) -> None:
    """Every key of the plain dict ``cfg`` is one of ``known`` (a misspelt option is an error, not ignored)."""
    known = set(known)
    extra = sorted(k for k in cfg if k not in known)
    if extra:
        raise OptionError(f"{what}: unknown option(s) {', '.join(map(str, extra))} (known: {', '.join(sorted(known))})")


@contextlib.contextmanager
def refused_cleanly():
    """For entry points: an :class:`OptionError` is printed as one line (``[value-pl] config: ...``) and the
    process exits with status 2, instead of a stack trace; anything else propagates as it is."""
    try:
        yield
    except OptionError as e:
        print(f"[value-pl] config: {e}", file=sys.stderr)
        sys.exit(2)
