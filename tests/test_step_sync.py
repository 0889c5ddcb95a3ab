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
