"""sha256 checksums of files and directories (shard manifests, feature caches, checkpoint comparison), and of
canonical JSON records (a backbone's effective model config) with the fields two records differ in."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_path(path: str | Path, ignore: tuple[str, ...] | set[str] = ()) -> str:
    """sha256 of a file, or of a directory's files (sorted relative names and contents; names in ``ignore``
    are left out)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and x.name not in ignore):
        h.update(str(f.relative_to(p)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def canonical_sha256(obj) -> str:
    """sha256 (16 hex) of ``obj`` as canonical JSON (sorted keys; non-JSON values by ``str``): the same record
    gives the same hash in any process and dict order."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def field_differences(have: dict, want: dict, have_name: str = "saved", want_name: str = "now") -> list[str]:
    """``field=A (<have_name>) != B (<want_name>)`` for every key of both flat records whose values differ, in key
    order (keys only one of them has: :func:`one_sided_fields`)."""
    out = []
    for k in sorted(set(have) & set(want), key=str):
        a, b = have[k], want[k]
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{k}={a!r} ({have_name}) != {b!r} ({want_name})")
    return out


def one_sided_fields(have: dict, want: dict) -> list[str]:
    """The keys only one of two records has (e.g. a field another transformers version added to its configs)."""
    return sorted(set(have) ^ set(want), key=str)
