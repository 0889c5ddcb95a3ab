"""The host's resources a loader shares: free space in ``/dev/shm`` (where batches cross from the workers) and the CPU
cores that the workers and the main process, which drives the GPU, compete for."""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def shm_free(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory filesystem that loader workers hand batches over through (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(root: Path | None = None, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs per second this process's cgroup may use (its CFS quota / period: a container's ``--cpus``, a
    Kubernetes CPU limit); None where there is no limit or none can be read. cgroup v2 (``cpu.max`` of the
    process's own cgroup, else of the root that a container sees) or v1 (``cpu/cpu.cfs_quota_us``)."""
    root = CGROUP if root is None else Path(root)
    own = None
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                own = root / line[3:].strip().lstrip("/")
    except OSError:
        pass
    for d in [p for p in (own, root) if p is not None]:
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota == "max" or int(period) <= 0:
            return None
        return int(quota) / int(period)
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one, capped by its cgroup's CPU quota
    (rounded up), where one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    quota = cpu_quota()
    return min(cores, max(1, math.ceil(quota))) if quota else cores


def check_cores(root, workers: int, cores: int | None = None, ranks: int = 1) -> bool:
    """Warn when a GPU run's training loader has more workers than half the CPU cores it may use (``cores`` shared by
    the ``ranks`` processes of this node): the main process, which drives the GPU, and its pin-memory thread then
    compete with them, and with the validation loader's, which start during an epoch's last batches
    (``data.epoch_ahead``). On an H200 host with 16 cores, 8 workers fed training faster than 5, 12 or 15
    (docs/performance.md). True if warned."""
    cores = available_cores() if cores is None else cores
    ranks = max(1, int(ranks))
    share = cores // ranks
    if not cores or workers <= max(1, share // 2):
        return False
    where = f"{cores} CPU cores" if ranks == 1 else f"{cores} CPU cores shared by {ranks} processes (GPUs) of this node"
    msg = (f"{root}: data.num_workers={workers} on {where}: the main process, which drives the GPU, and its "
           f"pin-memory thread compete with the loader workers for cores (docs/performance.md measured 8 workers on 16 "
           f"cores feeding training ~1.3x faster than 15); try data.num_workers={max(1, share // 2)}")
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return True
