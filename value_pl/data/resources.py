"""The host's resources a loader shares: free space in ``/dev/shm`` (where batches cross from the workers) and the CPU
cores that the workers and the main process, which drives the GPU, compete for."""
from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger(__name__)


def shm_free(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory filesystem that loader workers hand batches over through (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


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
