"""What the dataset builders share: clear errors or counted skips (:class:`Issues`), order-independent seeded
randomness, box cleaning, id lists, a streaming JSON-array reader, progress bars and the count of captions a
held-out split shares with ``train`` (:class:`CaptionOverlap`)."""
from __future__ import annotations

import zlib

import numpy as np

from ..data.progress import progress as _progress
from .regions import FeatureDimError, FeatureError, FeatureNaNError, open_features


class BuildError(ValueError):
    """Bad input that stops a build; the message names the file and line/record."""


class Issues:
    """Per-record problems: raise :class:`BuildError` when ``strict`` else count a skip in the manifest.

    The first few locations of each skip reason are kept (``skipped_examples`` in the manifest).
    """

    def __init__(self, writer=None, strict: bool = False, examples: int = 5):
        self.writer = writer
        self.strict = strict
        self.examples_per_reason = examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def bad(self, reason: str, where: str, msg: str, n: int = 1, *, always_raise: bool = False) -> None:
        text = f"{where}: {msg}" if where else msg
        if self.strict or always_raise:
            raise BuildError(text)
        self.count(reason, n)
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.examples_per_reason:
            ex.append(text)

    def exclude(self, reason: str, n: int = 1) -> None:
        """Count candidates left out on purpose (manifest ``excluded``), e.g. a negative that is the gold object."""
        if n > 0 and self.writer is not None:
            self.writer.exclude(reason, n)

    def count(self, reason: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + n
        if self.writer is not None:
            self.writer.skip(reason, n)


class CaptionOverlap:
    """Counts, per split other than ``train``, the written samples whose caption (words joined, lower case) is also
    the caption of a ``train`` sample: text a prober may have memorised with its label (manifest
    ``caption_overlap``). Wrap each split's sample iterator with :meth:`wrap`; :meth:`report` once all are written
    (any split order)."""

    def __init__(self, ref: str = "train"):
        self.ref = ref
        self.texts: dict[str, list[str]] = {}

    def wrap(self, split: str, samples):
        texts = self.texts.setdefault(split, [])
        for key, meta, feats in samples:
            texts.append(" ".join(meta["words"]).lower())
            yield key, meta, feats

    def report(self) -> dict:
        ref = set(self.texts.get(self.ref, ()))
        return {s: {"samples": len(t), "caption_in_train": sum(1 for x in t if x in ref)}
                for s, t in self.texts.items() if s != self.ref}


def sample_rng(seed: int, *parts) -> np.random.Generator:
    """A generator seeded by ``seed`` and a stable hash of ``parts`` (independent of processing order)."""
    h = zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8"))
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, h])


def stable_score(seed: int, *parts) -> int:
    """A deterministic pseudo-random 64-bit score for sampling by "keep the lowest scores"."""
    import hashlib

    d = hashlib.blake2b("\x1f".join(str(p) for p in (seed,) + parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(d, "big")


def clean_box(box, width: float, height: float, tol: float = 1.0):
    """``(box, None)`` with the box clipped to the image, or ``(None, reason)``.

    ``reason`` is ``box_zero_area`` (x2 <= x1 or y2 <= y1) or ``box_outside_image`` (beyond the image
    by more than ``tol`` pixels on any side).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        return None, "box_outside_image"
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return None, "box_outside_image"
    x1, y1 = max(0.0, x1), max(0.0, y1)
    x2, y2 = min(float(width), x2), min(float(height), y2)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None, "box_zero_area"
    return [x1, y1, x2, y2], None


def read_id_list(path, what: str = "image id") -> list[str]:
    """One id a line (blank lines ignored); a duplicate raises naming file and line."""
    out, seen = [], {}
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            if s in seen:
                raise BuildError(f"{path}:{ln}: duplicate {what} {s} (first at line {seen[s]})")
            seen[s] = ln
            out.append(s)
    return out


def text_lines(path):
    """``(line number, text, problem)`` for each line of a text file (split at ``\\n``, ``\\r\\n`` or ``\\r``, line
    endings removed): ``text`` is the line decoded as UTF-8, or ``None`` and ``problem`` says which byte is not UTF-8
    (the caller raises or counts a skip naming the file and line; a bare UnicodeDecodeError would name neither)."""
    with open(path, "rb") as f:
        data = f.read()
    for ln, raw in enumerate(data.splitlines(), 1):
        try:
            yield ln, raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            yield ln, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}: {e.reason})"


def iter_json_array(path, chunk: int = 1 << 22):
    """Stream the elements of a top-level JSON array (the multi-GB VG files) without loading it whole.

    Memory: one element (one image) at a time plus a read buffer. A truncated or malformed file, or one that is
    not UTF-8, raises :class:`BuildError` naming the file and the record index.
    """
    done = 0
    try:
        for obj in _json_array(path, chunk):
            yield obj
            done += 1
    except UnicodeDecodeError as e:
        raise BuildError(f"{path}: not UTF-8 text ({e.reason}, in the bytes read after record {done}); JSON files "
                         f"must be UTF-8") from None


def _json_array(path, chunk: int):
    import json

    dec = json.JSONDecoder()
    n = 0
    with open(path, encoding="utf-8") as f:
        buf, pos = f.read(chunk), 0
        while pos < len(buf) and buf[pos].isspace():
            pos += 1
        if pos >= len(buf) or buf[pos] != "[":
            raise BuildError(f"{path}: expected a JSON array (file starts with {buf[pos:pos + 20]!r})")
        pos += 1
        expect_sep = False
        while True:
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf):
                    break
                more = f.read(chunk)
                if not more:
                    raise BuildError(f"{path}: truncated JSON array after record {n}")
                buf, pos = buf[pos:] + more, 0
            c = buf[pos]
            if c == "]":
                return
            if expect_sep:
                if c != ",":
                    raise BuildError(f"{path}: record {n}: expected ',' or ']' but found {buf[pos:pos + 20]!r}")
                pos += 1
                expect_sep = False
                continue
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                more = f.read(max(chunk, len(buf)))
                if not more:
                    raise BuildError(f"{path}: record {n}: truncated or malformed JSON ({e.msg})") from None
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            n += 1
            pos, expect_sep = end, True
            if pos > chunk:
                buf, pos = buf[pos:], 0


def progress(iterable, enabled: bool, **kw):
    """A bar with rate and ETA (:func:`value_pl.data.progress.progress`): quiet under ``progress=false`` and
    when stderr is not a terminal (CI logs)."""
    return _progress(iterable, enabled, **kw)


def read_features(reader, iid, W, H, issues: Issues, what: str):
    """Features of one image in pixels of the annotation's size, or None (counted skip)."""
    if iid not in reader:
        issues.bad("no_features", f"{reader.path}", f"no {what} features for image {iid}")
        return None
    try:
        rf = reader.get(iid)
    except FeatureDimError:
        raise
    except FeatureNaNError as e:
        issues.bad("nan_features", str(e).split(": ")[0], str(e))
        return None
    except FeatureError as e:
        issues.bad("corrupt_features", str(e).split(": ")[0], str(e))
        return None
    if rf.num_boxes == 0:
        issues.bad("no_features", rf.where, f"image {iid} has 0 {what} regions")
        return None
    return rf.in_pixels(W, H)


def open_region_features(cfg: dict, feature_dim: int | None):
    """The detected features (``features``) and, when given, the annotated boxes' (``annotated_features``)."""
    uniter_kw = dict(cfg.get("uniter") or {})
    det = open_features(cfg["features"], cfg.get("features_format", "auto"), feature_dim, **uniter_kw)
    sup = None
    if cfg.get("annotated_features"):
        sup = open_features(cfg["annotated_features"], cfg.get("annotated_features_format", "auto"), feature_dim,
                            **uniter_kw)
    return det, sup


def regions_manifest(cfg: dict, det, sup) -> dict:
    """The manifest's ``regions`` entry: how annotated boxes and detections were combined."""
    return {"mode": "supplied" if sup is not None else "iou_match", "iou_threshold": cfg["iou_threshold"],
            "max_regions": cfg["max_regions"], "features_format": det.format}


def close_readers(*readers) -> None:
    for r in readers:
        if r is not None:
            r.close()

