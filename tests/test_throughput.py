"""The per-epoch throughput record: samples/s, the share of time waiting for data, and within that wait the share
spent moving batches to the device (``transfer_frac``); validation's transfers are not counted in it; the wait
before each epoch's first batch (``first_wait_s``)."""
from __future__ import annotations

import time
from types import SimpleNamespace

from value_pl.driver.throughput import ThroughputMonitor


class FakeModule:
    """What the monitor reads of a ProbeModule: its device, the seconds its batch transfers took so far, log_dict."""

    def __init__(self):
        self.device = SimpleNamespace(type="cpu")
        self.transfer_s = 0.0
        self.logged = []

    def log_dict(self, d, **kw):
        self.logged.append(d)

    def transfer(self, seconds):
        time.sleep(seconds)
        self.transfer_s += seconds


def test_the_transfer_share_counts_training_transfers_only():
    mon = ThroughputMonitor(verbose=False)
    m = FakeModule()
    trainer = SimpleNamespace(num_training_batches=3, world_size=1, current_epoch=0, is_global_zero=True)
    mon.on_train_epoch_start(trainer, m)
    for i in range(3):
        m.transfer(0.02)  # the wait before batch i: fetching, then the transfer
        mon.on_train_batch_start(trainer, m, {"counts": {"samples": 4, "pairs": 8}}, i)
        time.sleep(0.01)  # the step
        mon.on_train_batch_end(trainer, m, None, {}, i)
    m.transfer(0.05)  # a validation run after the last training batch: outside the window
    mon.on_train_epoch_end(trainer, m)
    rec = mon.epochs[-1]
    assert rec["batches"] == 3
    assert abs(rec["transfer_frac"] * rec["seconds"] - 0.06) < 1e-3  # (seconds: rounded to the ms)
    assert 0 < rec["transfer_frac"] <= rec["data_wait_frac"] <= 1
    assert m.logged[-1]["perf/transfer_frac"] == rec["transfer_frac"]
    # the wait before the first batch, alone: one of the three waits, part of the epoch's
    assert 0.015 <= rec["first_wait_s"] <= rec["data_wait_frac"] * rec["seconds"] - 0.03
    # the next epoch counts from its own start
    mon.on_train_epoch_start(trainer, m)
    mon.on_train_batch_start(trainer, m, {"counts": {"samples": 4}}, 0)
    mon.on_train_batch_end(trainer, m, None, {}, 0)
    mon.on_train_epoch_end(trainer, m)
    assert mon.epochs[-1]["transfer_frac"] == 0


def test_a_module_without_a_transfer_clock_reports_none():
    mon = ThroughputMonitor(verbose=False)
    m = FakeModule()
    del m.transfer_s
    trainer = SimpleNamespace(num_training_batches=1, world_size=1, current_epoch=0, is_global_zero=True)
    mon.on_train_epoch_start(trainer, m)
    mon.on_train_batch_start(trainer, m, {}, 0)
    mon.on_train_batch_end(trainer, m, None, {}, 0)
    mon.on_train_epoch_end(trainer, m)
    assert mon.epochs[-1]["transfer_frac"] is None
