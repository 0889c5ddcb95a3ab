"""DDP on CPU (gloo, 2 processes): evaluation == 1-process evaluation, uneven shards do not hang,
2-process training reaches the 1-process accuracy, too few shards is a clear error."""
import json

import pytest

from conftest import compose, run_cli
from test_cache import small_demo, tiny_backbone

FAST = ["logger=none", "trainer.enable_progress_bar=false"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def n_pairs(man, split, task):
    return sum(man["splits"][split]["pairs"][task].values())


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_train_and_eval_match_single_process(tmp_path):
    from value_pl.driver.train import evaluate, train

    root = tmp_path / "uneven"
    # 5 samples per shard: train 7+1 shards (last has 2), val 5,5,3 and test 5,5,1 -> the two ranks get
    # different numbers of samples and batches in every split
    man = small_demo(root, splits={"train": 37, "val": 13, "test": 11}, maxcount=5)
    assert [len(man["splits"][s]["shards"]) for s in ("train", "val", "test")] == [8, 3, 3]
    common = ["prober=layer_emb", "task=vrc", f"data.root={root}", *tiny_backbone(tmp_path), "layers=[0,2]",
              "trainer.max_epochs=4", "data.batch_size=4", "data.eval_batch_size=4", "optim.lr=0.005", *FAST]
    # 2 processes: train_batches defaults to samples / (batch x world), so both runs see ~one pass per epoch
    d2 = tmp_path / "train2"
    run_cli("value_pl.train", common + DDP, d2, timeout=300)
    r2 = json.loads((d2 / "results.json").read_text())
    r1 = train(compose(common + [f"run_dir={tmp_path / 'train1'}"]))
    for res in (r1, r2):  # every val/test pair counted exactly once, no padding in the metrics
        assert res["pairs_evaluated"] == {"val": n_pairs(man, "val", "vrc"), "test": n_pairs(man, "test", "vrc")}
    acc1 = max(r["test_acc"] for r in r1["layers"])
    acc2 = max(r["test_acc"] for r in r2["layers"])
    assert acc2 > r2["majority"] and abs(acc1 - acc2) < 0.15, (r1["layers"], r2["layers"])

    # the same checkpoint evaluated by 2 processes and by 1 gives identical metrics
    ckpt = d2 / "checkpoints" / "last.ckpt"
    e2d = tmp_path / "eval2"
    run_cli("value_pl.eval", [f"ckpt_path={ckpt}", f"data.root={root}", "data.eval_batch_size=4", *FAST, *DDP],
            e2d, timeout=300)
    e2 = json.loads((e2d / "results.json").read_text())
    e1 = evaluate(compose([f"ckpt_path={ckpt}", f"data.root={root}", "data.eval_batch_size=4", *FAST,
                           f"run_dir={tmp_path / 'eval1'}"], config_name="eval"))
    assert [(r["name"], r["val_acc"], r["test_acc"]) for r in e1["layers"]] == \
        [(r["name"], r["val_acc"], r["test_acc"]) for r in e2["layers"]]
    assert e1["pairs_evaluated"] == e2["pairs_evaluated"] == r1["pairs_evaluated"]


def test_too_few_shards_is_a_clear_error(tmp_path):
    from value_pl.data.datamodule import ShardDataModule

    root = tmp_path / "demo"
    small_demo(root, splits={"train": 12, "val": 4, "test": 4}, maxcount=5)  # 3 train shards, 1 val shard
    dm = ShardDataModule(root, num_workers=2)
    with pytest.raises(ValueError, match="every worker needs a shard"):
        dm._workers(3, 2, "train")  # 2 ranks x 2 workers > 3 shards
    with pytest.raises(ValueError, match="every rank needs at least one shard"):
        dm._workers(1, 2, "val")
    assert dm._workers(1, 1, "val") == 1  # eval reads once: fewer workers, no error
    assert ShardDataModule(root, num_workers=2, auto_workers=True)._workers(3, 2, "train") == 1
    assert dm._workers(4, 2, "train") == 2
