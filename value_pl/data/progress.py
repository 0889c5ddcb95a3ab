"""Progress bars for long work (shard builds, feature extraction, analyses, checkpoint comparison).

One helper so every bar looks and behaves the same: tqdm with a rate and, when the total is known, an ETA;
quiet under ``progress=false`` and whenever the bar's stream is not a terminal (CI logs, redirected output),
so logs do not fill with carriage-return frames. Training's bar is Lightning's (``trainer.enable_progress_bar``).
"""
from __future__ import annotations


def progress(iterable=None, enabled: bool = True, **kw):
    """A ``tqdm`` over ``iterable`` (or a manual bar: ``.update(n)``) -- disabled when not ``enabled`` or when
    its file (default stderr) is not a TTY. A disabled bar still iterates, updates, ``write()``s and closes."""
    from tqdm import tqdm

    kw.setdefault("mininterval", 1.0)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if enabled else True, **kw)
