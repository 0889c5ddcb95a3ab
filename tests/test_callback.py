"""``ProbeCallback`` in a toy pretraining run: logs at the right steps and leaves training exactly as
it would be without it (parameters, mode flags, requires_grad, RNG states)."""
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

REPO = Path(__file__).resolve().parents[1]
SUITE = dict(batch_size=16, analysis_samples=8, kmeans={"n_init": 2, "max_iter": 10}, train_samples=32,
             val_samples=16, test_samples=16, epochs=1, rank=8)


def _example():
    spec = importlib.util.spec_from_file_location("pretrain_example", REPO / "examples" / "pretrain_with_probe_callback.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class ListLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "list"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def snapshot(module):
    return {
        "training": [(n, m.training) for n, m in module.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in module.named_parameters()],
        "torch_rng": torch.get_rng_state().clone(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state(),
        "grad_enabled": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
    }


def same(a, b):
    assert a["training"] == b["training"]
    assert a["requires_grad"] == b["requires_grad"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert a["py_rng"] == b["py_rng"]
    assert a["np_rng"][0] == b["np_rng"][0] and np.array_equal(a["np_rng"][1], b["np_rng"][1])
    assert a["np_rng"][2:] == b["np_rng"][2:]
    assert a["grad_enabled"] == b["grad_enabled"] and a["threads"] == b["threads"]


class Recorder(pl.Callback):
    """Runs after the probe callback: the training state at the end of every step."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append((trainer.global_step, snapshot(pl_module)))


@pytest.fixture(scope="module")
def toy(demo_root):
    ex = _example()
    from value_pl.compare.suite import SuiteData, suite_config

    data = SuiteData.load(demo_root, suite_config(SUITE))
    return ex, data


def fit(ex, data, callbacks, steps=4, epochs=None, n=24):
    pl.seed_everything(0, verbose=False)
    model = ex.ToyPretraining(img_dim=int(data.manifest["feature_dim"]), seed=0)
    logger = ListLogger()
    rec = Recorder()
    trainer = pl.Trainer(max_steps=steps if epochs is None else -1, max_epochs=epochs, logger=logger,
                         callbacks=[*callbacks, rec], accelerator="cpu", devices=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, ex.toy_loader(data, model.encoder.collator(), n=n, batch_size=8))
    return model, logger, rec, snapshot(model)


def careless_adapter(pl_module):
    """An adapter that disturbs everything the callback promises to restore."""
    torch.rand(3)
    random.random()
    np.random.rand(2)
    pl_module.head.eval()
    pl_module.encoder.requires_grad_(False)
    return pl_module.encoder


def test_callback_logs_at_steps_and_leaves_training_untouched(toy):
    ex, data = toy
    from value_pl.callbacks import ProbeCallback

    m0, log0, rec0, end0 = fit(ex, data, [])
    cb = ProbeCallback(adapter=careless_adapter, data=data, suite=SUITE, every_n_steps=2, on_error="raise")
    m1, log1, rec1, end1 = fit(ex, data, [cb])

    probe_steps = [s for s, m in log1.rows if "probe/fusion/nmi/mean" in m]
    assert probe_steps == [2, 4] and [s for s, _ in cb.history] == [2, 4]
    assert not any("probe/fusion/nmi/mean" in m for _, m in log0.rows)
    keys = set(cb.history[0][1])
    for k in ("probe/fusion/nmi/mean", "probe/modality/text", "probe/vcc/acc/best", "probe/vrc/acc/best"):
        assert k in keys, sorted(keys)
    assert cb.history[0][1] != cb.history[-1][1]  # the weights moved between probes

    # exactly the same training: per-step state, final parameters and RNG states
    assert [s for s, _ in rec0.states] == [s for s, _ in rec1.states] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(rec0.states, rec1.states):
        same(a, b)
    same(end0, end1)
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert any(p.requires_grad for p in m1.encoder.parameters())  # the suite's freeze() was undone
    # ... and so is its frozen state: the user's unfrozen backbone still trains with dropout after a probe
    assert m1.encoder._frozen is False
    m1.train()
    assert all(x.training for x in m1.encoder.modules())
    # the user's losses are identical too
    l0 = [m["train/loss"] for _, m in log0.rows if "train/loss" in m]
    l1 = [m["train/loss"] for _, m in log1.rows if "train/loss" in m]
    assert l0 == l1 and len(l0) == 4


def test_callback_every_n_epochs_and_example(toy, tmp_path, monkeypatch):
    ex, data = toy
    from value_pl.callbacks import ProbeCallback, attr_adapter

    cb = ProbeCallback(adapter=attr_adapter("encoder"), data=data, suite=SUITE, every_n_epochs=1, on_error="raise")
    def broken(pl_module):
        careless_adapter(pl_module)
        raise RuntimeError("adapter bug")

    bad = ProbeCallback(adapter=broken, data=data, suite=SUITE, every_n_steps=1)  # on_error="warn"
    _, log, rec, _ = fit(ex, data, [cb, bad], epochs=2, n=16)  # 16 samples / 8 = 2 steps per epoch
    assert [s for s, m in log.rows if "probe/vrc/acc/best" in m] == [2, 4]
    assert bad.history == [] and len(rec.states) == 4  # a failing suite does not stop training ...
    assert all(flag for _, st in rec.states for _, flag in st["requires_grad"])
    assert all(t for _, st in rec.states for n, t in st["training"] if n == "head")  # ... nor leave state behind
    with pytest.raises(ValueError):
        ProbeCallback(adapter=attr_adapter("encoder"), data=data)
    # the example script itself (with this test's tiny suite)
    monkeypatch.setattr(ex, "TOY_SUITE", SUITE)
    summary = ex.main(["--shards", str(data.root), "--steps", "2", "--every", "2", "--out", str(tmp_path / "ex")])
    assert summary["steps"] == [2]
    assert "probe/fusion/nmi/mean" in (tmp_path / "ex" / "csv" / "metrics.csv").read_text()


def test_callback_resume_with_accumulation_does_not_repeat_a_step(toy, tmp_path):
    """accumulate_grad_batches=2, a probe and a checkpoint every 2 steps: a run resumed from the step-2
    checkpoint probes step 4 only. Its first batches still have global_step 2 (no optimizer step yet):
    the callback fires on optimizer steps only, and the checkpoint holds the last probed step (so that
    at_start=True does not probe step 2 again either)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from value_pl.callbacks import ProbeCallback, attr_adapter

    def run(max_steps, out, ckpt=None, at_start=False):
        pl.seed_everything(0, verbose=False)
        model = ex.ToyPretraining(img_dim=int(data.manifest["feature_dim"]), seed=0)
        cb = ProbeCallback(adapter=attr_adapter("encoder"), data=data, suite=SUITE, every_n_steps=2,
                           at_start=at_start, on_error="raise")
        logger = ListLogger()
        mc = ModelCheckpoint(dirpath=str(out), every_n_train_steps=2, save_top_k=-1)
        trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, logger=logger, callbacks=[cb, mc],
                             accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, ex.toy_loader(data, model.encoder.collator(), n=48, batch_size=4), ckpt_path=ckpt)
        logged = [s for s, m in logger.rows if "probe/fusion/nmi/mean" in m]
        return [s for s, _ in cb.history], logged, cb

    ex, data = toy
    hist, logged, cb = run(2, tmp_path / "first")
    assert hist == logged == [2]
    ckpt = tmp_path / "first" / "epoch=0-step=2.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    state = saved["callbacks"].pop(cb.state_key, None)
    # without the callback's saved state (a checkpoint from before it had one): optimizer steps only
    torch.save(saved, tmp_path / "stateless.ckpt")
    hist, logged, _ = run(4, tmp_path / "resumed", tmp_path / "stateless.ckpt")
    assert hist == logged == [4]
    assert state == {"last_step": 2}
    # with it: at_start=True on resume does not probe the checkpoint's step again
    hist, logged, _ = run(4, tmp_path / "resumed2", ckpt, at_start=True)
    assert hist == logged == [4]
