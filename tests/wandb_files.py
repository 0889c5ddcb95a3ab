"""Read what an offline W&B run logged, from its files (no account, no network, no wandb API).

An offline run directory ``offline-run-*/`` holds ``run-<id>.wandb``: a log of protobuf ``Record`` messages in
32 KiB blocks (LevelDB log format: a 7-byte header ``:W&B`` + magic + version, then chunks of crc32 (4),
length (2, little endian), type (1: full, 2: first, 3: middle, 4: last) and data). Tables and custom charts
are written as JSON under ``files/media/table/``.
"""
from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path):
    """Yield every ``wandb_internal_pb2.Record`` of a ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, buf = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            yield r
            buf = b""


def _items(items) -> dict:
    """Update items -> a dict; a nested key (``a``, ``b``) becomes ``{"a": {"b": value}}``."""
    out: dict = {}
    for i in items:
        keys = list(i.nested_key) or [i.key]
        d = out
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = json.loads(i.value_json)
    return out


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


@dataclass
class OfflineRun:
    dir: Path
    group: str = ""
    name: str = ""
    job_type: str = ""
    project: str = ""
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    step_metrics: dict = field(default_factory=dict)  # metric name -> its x-axis (define_metric)

    def table(self, key: str) -> dict:
        """The JSON of the last table (or custom chart table) logged under ``key``."""
        ref = None
        for h in self.history:
            if key in h:
                ref = h[key]
        if ref is None and key in self.summary:
            ref = self.summary[key]
        assert ref is not None, f"{key} not logged (history keys: {sorted({k for h in self.history for k in h})})"
        return json.loads((self.dir / "files" / ref["path"]).read_text())

    def chart(self, key: str) -> dict:
        """A custom chart's settings (``title``, ``xname``, ``x``, ``y`` ...) and its data table's JSON."""
        panel = self.config["_wandb"]["visualize"][key]["panel_config"]
        table_key = panel["userQuery"]["queryFields"][0]["fields"][-1]["args"][0]["value"]
        return {**panel.get("stringSettings", {}), **panel.get("fieldSettings", {}), "table": self.table(table_key)}

    def column(self, key: str, col: str) -> list:
        t = self.table(key)
        i = t["columns"].index(col)
        return [row[i] for row in t["data"]]


def _complete(f: Path, timeout: float) -> list:
    """The records of a finished run: W&B's service may still be writing the file when ``finish()`` returns,
    so wait (up to ``timeout`` s) for the run's ``exit`` record."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            recs = list(records(f))
        except DecodeError:  # a record still being written: read again
            if time.monotonic() > deadline:
                raise
            recs = []
        if (recs and recs[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def read_run(run_dir: Path, timeout: float = 60.0) -> OfflineRun:
    run_dir = Path(run_dir)
    f = next(run_dir.glob("run-*.wandb"))
    out = OfflineRun(run_dir)
    for r in _complete(f, timeout):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.group, out.name, out.job_type = r.run.run_group, r.run.display_name, r.run.job_type
            out.project = r.run.project
            _merge(out.config, _items(r.run.config.update))
        elif kind == "history":
            out.history.append(_items(r.history.item))
        elif kind == "summary":
            _merge(out.summary, _items(r.summary.update))
        elif kind == "config":
            _merge(out.config, _items(r.config.update))
        elif kind == "metric":
            out.step_metrics[r.metric.name or r.metric.glob_name] = r.metric.step_metric
    return out


def offline_runs(root: Path) -> list[OfflineRun]:
    """Every offline run under ``root`` (searched recursively), oldest first."""
    return [read_run(d) for d in sorted(Path(root).rglob("offline-run-*")) if d.is_dir()]
