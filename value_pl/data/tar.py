"""Our tar reader for WebDataset shards: ustar with pax/GNU long-name headers, header checksums verified, members
read from the file or viewed in a map of it (``view``: nothing copied until a decoder copies it). A corrupt or
truncated shard is a :class:`~value_pl.data.schema.SchemaError` naming the file and byte offset; samples are
WebDataset-style dicts (:func:`iter_samples`), and a range of them skips the earlier ones by their headers only.
"""
from __future__ import annotations

import functools
import mmap
import os
from typing import Callable, Iterator

from .schema import SchemaError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)


def _octal(field: bytes, path: str, offset: int) -> int:
    s = field.rstrip(b"\0 ").lstrip(b" ")
    if not s:
        return 0
    if field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    try:
        return int(s, 8)
    except ValueError:
        raise SchemaError(f"{path}: corrupt tar header at byte {offset} (bad number {s!r})") from None


def _pax(data: bytes) -> dict[str, str]:
    """pax extended header records ``"<length> <key>=<value>\\n"``; ``ValueError`` (saying which record and what is
    wrong) for a record whose length does not cover its own length field or runs past the data: a length of 0 would
    otherwise never advance."""
    out, i = {}, 0
    while i < len(data):
        sp = data.find(b" ", i, i + 21)
        digits = data[i:sp] if sp > i else b""
        if not digits.isdigit():
            raise ValueError(f"record at byte {i} of the header data has no decimal length: {data[i:i + 20]!r}")
        n = int(digits)
        if n <= sp + 1 - i or i + n > len(data):
            raise ValueError(f"record at byte {i} of the header data declares length {n}, outside "
                             f"{sp + 2 - i}..{len(data) - i}")
        rec = data[sp + 1:i + n]
        if rec[-1:] != b"\n" or b"=" not in rec:
            raise ValueError(f"record at byte {i} of the header data is not 'key=value\\n': {rec[:40]!r}")
        k, _, v = rec[:-1].partition(b"=")
        out[k.decode()] = v.decode("utf-8", "replace")
        i += n
    return out


def iter_members(path: str, read: Callable[[str], bool] = lambda name: True, view: bool = False):
    """Yield ``(name, data or None, header offset)`` for the regular files of a tar, in order.

    ``read(name)`` says whether to read a member's bytes; unread members are skipped by seeking. ``view``: each
    member's data is a read-only ``memoryview`` of the file mapped into memory (:class:`mmap.mmap`) instead of
    ``bytes`` read from it: nothing is copied until a decoder copies it (a sample's features, into its batch), and
    the headers are parsed from the map without a system call each. The map stays alive while any view of it does.
    (A shard truncated *while* it is mapped would raise SIGBUS in the reading process. The builders never
    truncate: :mod:`value_pl.datasets.writer` renames a new shard set into place and deletes the old files, which
    leaves a mapped file whole. ``data.map_shards=false`` reads instead.)
    """
    size_total = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        if view and size_total:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            size_total = len(mm)
            mv = memoryview(mm)

            def get(at: int, n: int):
                return mv[at:at + n]

            def header(at: int) -> bytes:
                return mm[at:at + BLOCK]
        else:
            def get(at: int, n: int):
                f.seek(at)
                return f.read(n)

            header = functools.partial(get, n=BLOCK)
        yield from _members(path, size_total, read, get, header)


def _members(path: str, size_total: int, read, get, header):
    off, long_name, pax = 0, None, {}
    while True:
        h = header(off)
        if len(h) < BLOCK:
            if not h:
                return  # no end-of-archive blocks: accepted (a writer that never closed cleanly)
            raise SchemaError(f"{path}: truncated tar header at byte {off}")
        if h == _ZERO_BLOCK:
            return
        chk = _octal(h[148:156], path, off)
        if chk != sum(h) - sum(h[148:156]) + 8 * 32:
            raise SchemaError(f"{path}: corrupt tar header at byte {off} (checksum mismatch)")
        size = _octal(h[124:136], path, off)
        kind = h[156:157]
        data_off = off + BLOCK
        nxt = data_off + (size + BLOCK - 1) // BLOCK * BLOCK
        if data_off + size > size_total:
            raise SchemaError(f"{path}: truncated tar member at byte {off} ({size} bytes declared)")
        if kind in (b"x", b"L"):
            raw = bytes(get(data_off, size))
            if kind == b"x":
                try:
                    pax = _pax(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    raise SchemaError(f"{path}: corrupt pax header at byte {off} ({e})") from None
            else:
                long_name = raw.rstrip(b"\0").decode("utf-8", "replace")
            off = nxt
            continue
        if kind in (b"0", b"\0", b"7"):
            name = pax.get("path") or long_name
            if name is None:
                prefix = h[345:500].rstrip(b"\0").decode("utf-8", "replace")
                name = h[0:100].rstrip(b"\0").decode("utf-8", "replace")
                if prefix and h[257:262] == b"ustar":
                    name = prefix + "/" + name
            if "size" in pax:
                # digits only: a negative size would seek backwards (and could loop over the same headers)
                if not (pax["size"].isascii() and pax["size"].isdigit()):
                    raise SchemaError(f"{path}: corrupt pax header before byte {off} (size={pax['size']!r} is "
                                      f"not a byte count)")
                size = int(pax["size"])
                nxt = data_off + (size + BLOCK - 1) // BLOCK * BLOCK
                if data_off + size > size_total:
                    raise SchemaError(f"{path}: truncated tar member at byte {off} ({size} bytes declared)")
            data = None
            if read(name):
                data = get(data_off, size)
                if len(data) != size:
                    raise SchemaError(f"{path}: truncated tar member {name} at byte {off}")
            yield name, data, off
        off, long_name, pax = nxt, None, {}


def split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): WebDataset's key is the name up to the first dot
    of the file name."""
    d, _, base = name.rpartition("/")
    k, dot, ext = base.partition(".")
    return (d + "/" + k if d else k), ext


def iter_samples(path: str, start: int = 0, stop: int | None = None, view: bool = False) -> Iterator[dict]:
    """Samples ``[start, stop)`` of one shard as WebDataset-style dicts ``{"__key__", "__url__", "__index__",
    ext: bytes}`` (``view``: ``ext: memoryview`` of the mapped shard, :func:`iter_members`). Members of samples
    before ``start`` are skipped without reading their bytes."""
    state = {"i": -1, "key": None}

    def want(name):
        key, _ = split_name(name)
        if key != state["key"]:
            state["key"] = key
            state["i"] += 1
        return state["i"] >= start

    cur, idx = None, -1
    for name, data, _ in iter_members(path, want, view):
        key, ext = split_name(name)
        if cur is None or key != cur["__key__"]:
            if cur is not None and idx >= start:
                yield cur
            idx += 1
            if stop is not None and idx >= stop:
                return
            cur = {"__key__": key, "__url__": path, "__index__": idx}
        if data is not None:
            if ext in cur:
                raise SchemaError(f"{path}: sample {key} has two .{ext} files")
            cur[ext] = data
    if cur is not None and idx >= start and (stop is None or idx < stop):
        yield cur


def count_samples(path: str) -> int:
    """Samples in one shard (one pass over its tar headers; no data is read)."""
    n, last = 0, None
    for name, _, _ in iter_members(path, lambda name: False, view=True):
        key, _ = split_name(name)
        if key != last:
            n, last = n + 1, key
    return n
