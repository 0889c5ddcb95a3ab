"""Every pair task and a SentEval task train (fast_dev_run) from shards built from the fixtures.

Runs ``value_pl.driver.train.train`` in-process on the composed ``train`` config (the same as
``python -m value_pl.train task=<t> data=shards data.root=<built> trainer=cpu logger=none
trainer.fast_dev_run=true``), to keep the suite fast.
"""
from __future__ import annotations

import pytest

from fixtures_data import build, write_flickr30k, write_senteval, write_vg

pytest.importorskip("pytorch_lightning")
from value_pl import CONFIG_DIR  # noqa: E402
from value_pl.driver.train import train  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    t = tmp_path_factory.mktemp("built")
    build("flickr30k", t / "f30k", write_flickr30k(t / "in_f30k"))
    build("vg", t / "vg", write_vg(t / "in_vg"))
    build("senteval", t / "se", write_senteval(t / "in_se"))
    return t


def _train(root, task, rdir, extra=()):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    ov = [f"task={task}", "data=shards", f"data.root={root}", "data.num_workers=0", "data.batch_size=4",
          "trainer=cpu", "logger=none", "++trainer.fast_dev_run=true", f"run_dir={rdir}",
          "layers=[0]"] + list(extra)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=ov)
    return train(cfg)


@pytest.mark.parametrize("task,data", [("vcd", "f30k"), ("vcc", "f30k"), ("vri", "vg"), ("vrc", "vg")])
def test_pair_tasks_train(built, tmp_path, task, data):
    # the Flickr30k fixture's val split is empty (its only image has no boxes): validate on train
    extra = ["data.splits.val=train"] if data == "f30k" else []
    _train(built / data, task, tmp_path / "run", extra)
    assert (tmp_path / "run").exists()


def test_senteval_task_trains(built, tmp_path):
    _train(built / "se" / "sentlen", "vcd", tmp_path / "run",
           ["task.name=sentlen", "task.kind=sentence"])
    assert (tmp_path / "run").exists()
