"""Who used the CPU during a window of a run: each thread of this process and each process started under it (loader
workers, the forkserver), sampled from ``/proc`` (Linux), for ``gpu.py``'s end-to-end rows.

A share is CPU seconds per wall second (1.0: one core busy all the time). What it tells apart, when the training
loop waits for data: a main thread near 1.0 is bound by its own host work; a pin thread near 1.0 by the pin copy; loader
workers near 1.0 each by decoding; none of them near 1.0, by waiting on one another (the GIL, a queue) -- the main
thread's share then counts only the time it held a core.
"""
from __future__ import annotations

import bisect
import os
import threading
import time

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu(stat_path: str) -> tuple[float, int, str]:
    """(utime + stime in seconds, ppid, comm) of a ``/proc/.../stat`` file."""
    with open(stat_path) as f:
        s = f.read()
    comm = s[s.index("(") + 1:s.rindex(")")]
    fields = s[s.rindex(")") + 2:].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / TICK, int(fields[1]), comm


def _label(name: str | None, comm: str, main: bool) -> str:
    if main:
        return "main thread"
    if name and "_pin_memory_loop" in name:
        return "pin thread"
    if name:
        return "python threads"  # (this benchmark's samplers, Lightning's, W&B's)
    return "other threads"  # OpenMP (the pin copy's included), CUDA's, tokenizers'


def snapshot() -> dict[str, float]:
    """CPU seconds so far: per thread label of this process (summed), and per process under it (``pid <n>``)."""
    pid = os.getpid()
    names = {t.native_id: t.name for t in threading.enumerate()}
    main = threading.main_thread().native_id
    out: dict[str, float] = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                cpu, _, comm = _cpu(f"/proc/{pid}/task/{tid}/stat")
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            key = _label(names.get(int(tid)), comm, int(tid) == main)
            out[key] = out.get(key, 0.0) + cpu
        children: dict[int, list[int]] = {}
        procs: dict[int, float] = {}
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    cpu, ppid, _ = _cpu(f"/proc/{p}/stat")
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(p))
                procs[int(p)] = cpu
        todo = list(children.get(pid, []))
        while todo:  # every process under this one (forkserver workers are the server's children)
            p = todo.pop()
            out[f"pid {p}"] = procs[p]
            todo += children.get(p, [])
    except OSError:  # no /proc
        pass
    return out


class CpuShares:
    """Samples :func:`snapshot` every ``period`` seconds in a thread; :meth:`shares` reads a window afterwards."""

    def __init__(self, period: float = 0.2):
        self.period = period
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="cpu-share sampler").start()

    def _run(self):
        while not self.stop.is_set():
            self.samples.append((time.time(), snapshot()))
            time.sleep(self.period)

    def shares(self, start: float, end: float) -> dict:
        """Per label, CPU seconds per wall second over the samples nearest ``start`` .. ``end`` (``time.time()``);
        the processes under this one summed (``workers``: their share, count and largest single share)."""
        times = [t for t, _ in self.samples]
        if len(times) < 2:
            return {}
        i = max(0, min(bisect.bisect_left(times, start), len(times) - 2))
        j = max(i + 1, min(bisect.bisect_left(times, end), len(times) - 1))
        (t0, a), (t1, b) = self.samples[i], self.samples[j]
        wall = max(t1 - t0, 1e-9)
        out, procs = {}, []
        for k, v in b.items():
            share = (v - a.get(k, 0.0)) / wall
            if k.startswith("pid "):
                procs.append(share)
            else:
                out[k] = round(share, 2)
        busy = [s for s in procs if s > 0.01]  # (the forkserver itself idles)
        out["workers"] = {"total": round(sum(procs), 2), "busy": len(busy), "max": round(max(procs, default=0.0), 2)}
        out["window_s"] = round(wall, 2)
        return out
