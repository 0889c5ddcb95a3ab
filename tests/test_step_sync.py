"""The probe step never waits for the device: no operator in the forward, the heads, the loss, the backward or the
eval update needs a value back on the host (on a GPU each would stall the launch queue, and a step that is bound
by its host work -- docs/performance.md -- would pay the device's whole time on top)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_capture import demo_batch, tiny_uniter

# operators whose result size or value must be read on the host
SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
           "aten.is_nonzero.default", "aten.equal.default", "aten.allclose.default", "aten.unique_dim.default",
           "aten._unique2.default", "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor",
           "aten.lift_fresh.default"}  # lift_fresh: torch.tensor(python data) -- a pageable host-to-device copy


class SyncWatch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name in SYNCING or bool_index:
            self.seen.append(name + (" (boolean mask)" if bool_index else ""))
        return func(*args, **(kwargs or {}))


def test_the_watch_sees_syncs():
    x = torch.arange(6.0)
    with SyncWatch() as w:
        x.sum().item()
        x[x > 2]
        torch.tensor([1, 2])
    assert len(w.seen) == 3, w.seen


@pytest.mark.parametrize("task", ["vrc", "vcd"])
@pytest.mark.parametrize("prober", ["layer_emb", "attention"])
def test_probe_step_has_no_host_sync(tmp_path, task, prober):
    module, batch = demo_batch(tmp_path, tiny_uniter(tmp_path), task=task, prober=prober)
    opt = torch.optim.SGD(module.heads.parameters(), lr=0.1)  # Adam on CPU reads its step count on the host
    module._inputs(batch), module._eval_step(batch, module.val_acc, "val")  # warm-up: per-device caches made
    with SyncWatch() as w, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.loss(module._inputs(batch), batch["labels"])
        loss.backward()
        opt.step()
        with torch.no_grad():
            module._eval_step(batch, module.val_acc, "val")
    assert loss.requires_grad and module.val_acc.update_called
    assert w.seen == [], w.seen


class _Window(SyncWatch):
    """A :class:`SyncWatch` that records only while ``active``: the test opens it when a training batch starts and
    closes it when the loop asks the loader for the next batch (the loader's own host work is not the device's)."""

    active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.active:
            return func(*args, **(kwargs or {}))
        n = len(self.seen)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.seen) > n:
            self.seen[-1] = f"step {self.step}: {self.seen[-1]}"
        return out


def test_the_training_loop_has_no_host_sync_between_logging_steps(tmp_path):
    """The whole loop of ``python -m value_pl.train`` around a step -- Lightning's loop and optimizer closure under
    ``bf16-mixed``, the batch transfer, the progress bar, the throughput monitor, the checkpoint callback and the
    logger -- reads nothing back from the device, except on the steps where the logger writes ``train/loss``
    (every ``log_every_n_steps``). Every operator of the steps in between would run on the GPU, so one read there
    would make the host wait for the device on every step."""
    import warnings

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from conftest import compose
    from value_pl.driver.setup import make_logger, make_trainer
    from value_pl.driver.throughput import ThroughputMonitor

    module, batch = demo_batch(tmp_path, tiny_uniter(tmp_path), task="vrc", prober="attention")
    # fused Adam is what training uses on CUDA (its step counts stay on the device); on CPU the default Adam reads
    # them on the host, which on a GPU it does not
    module.configure_optimizers = lambda: torch.optim.Adam(module.heads.parameters(), lr=1e-3, fused=True)
    watch, steps, every = _Window(), 9, 4

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(steps):
                watch.active = False  # the loop is fetching the next batch
                yield batch
            watch.active = False

        def __len__(self):
            return steps

    class Open(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            watch.step = trainer.global_step + 1
            watch.active = True

        def on_train_epoch_end(self, trainer, pl_module):
            watch.active = False  # the epoch's end logs and computes: once per epoch

    cfg = compose(["trainer=gpu", "trainer.accelerator=cpu", "trainer.max_epochs=1",
                   f"trainer.log_every_n_steps={every}", "logger=csv"])
    assert cfg.trainer.precision == "bf16-mixed"
    trainer = make_trainer(cfg, tmp_path, make_logger(cfg, tmp_path),
                           [Open(), ThroughputMonitor(verbose=False),
                            ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)])
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch:
            trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == steps and watch.step == steps
    by_step: dict[int, list[str]] = {}
    for s in watch.seen:
        by_step.setdefault(int(s.split(":")[0].split()[1]), []).append(s.split(": ", 1)[1])
    logging = {s for s in range(1, steps + 1) if s % every == 0}
    # the first step makes per-device constants once (the pair maps' index tensors): host-to-device copies
    assert set(by_step.pop(1, [])) <= {"aten.lift_fresh.default"}, watch.seen
    assert set(by_step) <= logging, watch.seen  # steps 2-3, 5-7 and 9: nothing
    assert all("aten._local_scalar_dense.default" in by_step.get(s, []) for s in logging), watch.seen  # seen
