"""The CPU cores a loader may count on: the affinity mask, capped by a cgroup's CPU quota (a container's --cpus,
a Kubernetes CPU limit), read from cgroup v2 or v1 files; no limit and unreadable files leave the mask alone."""
from __future__ import annotations

import os

import pytest

from value_pl.data import resources


def _tree(tmp_path, files: dict, own: str | None = None):
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n" if own else "4:cpu,cpuacct:/\n")
    return proc


@pytest.mark.parametrize("files,own,want", [
    ({"cpu.max": "max 100000\n"}, None, None),  # v2, no limit
    ({"cpu.max": "250000 100000\n"}, None, 2.5),  # v2: docker --cpus 2.5
    ({"cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "400000 100000\n"}, "/kubepods/pod1", 4.0),  # its own
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, None),  # v1, no limit
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, 3.0),  # v1
    ({"cpu.max": "garbage\n"}, None, None),  # unreadable: no limit assumed
    ({}, None, None),
])
def test_cpu_quota_from_cgroup_files(tmp_path, files, own, want):
    proc = _tree(tmp_path, files, own)
    assert resources.cpu_quota(tmp_path, proc) == want


def test_the_quota_caps_the_cores_a_loader_counts(tmp_path, monkeypatch):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity mask on this OS")
    mask = len(os.sched_getaffinity(0))
    monkeypatch.setattr(resources, "cpu_quota", lambda: 0.5)  # half a CPU: still one core to count on
    assert resources.available_cores() == 1
    monkeypatch.setattr(resources, "cpu_quota", lambda: mask + 7.2)  # a quota above the mask: the mask
    assert resources.available_cores() == mask
    monkeypatch.setattr(resources, "cpu_quota", lambda: None)
    assert resources.available_cores() == mask
