"""DDP on CPU (gloo, 2 processes) with fewer shards than ranks x workers: evaluation == 1-process evaluation,
exact epochs, 2-process training reaches the 1-process accuracy."""
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
def test_ddp_train_and_eval_match_single_process_with_one_shard_per_split(tmp_path):
    """One shard per split (like Flickr30k's val/test) read by 2 ranks x 2 loader workers: every sample once
    in eval, an exact epoch in training, and 2-process evaluation == 1-process evaluation."""
    from value_pl.driver.train import evaluate, train

    root = tmp_path / "one_shard"
    man = small_demo(root, splits={"train": 97, "val": 13, "test": 11}, maxcount=100)
    assert [len(man["splits"][s]["shards"]) for s in ("train", "val", "test")] == [1, 1, 1]
    common = ["prober=layer_emb", "task=vrc", f"data.root={root}", *tiny_backbone(tmp_path), "layers=[0,2]",
              "trainer.max_epochs=5", "data.batch_size=4", "data.eval_batch_size=4", "optim.lr=0.01",
              "data.num_workers=2", *FAST]
    d2 = tmp_path / "train2"
    # (epochs and validation runs started ahead, and each worker's next first batch read ahead: the GPU defaults)
    run_cli("value_pl.train", common + DDP + ["data.epoch_ahead=true"], d2, timeout=300)
    r2 = json.loads((d2 / "results.json").read_text())
    r1 = train(compose(common + [f"run_dir={tmp_path / 'train1'}"]))
    for res in (r1, r2):  # every val/test pair counted exactly once, no padding in the metrics
        assert res["pairs_evaluated"] == {"val": n_pairs(man, "val", "vrc"), "test": n_pairs(man, "test", "vrc")}
        assert res["samples_seen"]["val"] == [13] * 5 and res["samples_seen"]["test"] == [11]
        assert res["pairs_dropped"] == {"train": 0, "val": 0, "test": 0}
    # an epoch is an epoch: 97 samples; 2 ranks read 48 each (the odd one waits for a later epoch)
    assert r1["samples_seen"]["train"] == [97] * 5 and r2["samples_seen"]["train"] == [96] * 5
    assert r1["throughput"]["train"]["samples_per_s"] > 0 and 0 <= r1["throughput"]["train"]["data_wait_frac"] <= 1
    for res in (r1, r2):  # persistent workers: each split's loader started its workers once in the run
        assert {k: len(v) for k, v in res["throughput"]["worker_start_s"].items()} == {"train": 1, "val": 1, "test": 1}
    acc1 = max(r["test_acc"] for r in r1["layers"])
    acc2 = max(r["test_acc"] for r in r2["layers"])
    assert acc2 > r2["majority"] and abs(acc1 - acc2) < 0.15, (r1["layers"], r2["layers"])

    # the same checkpoint evaluated by 2 processes and by 1 gives identical metrics
    ckpt = d2 / "checkpoints" / "last.ckpt"
    e2d = tmp_path / "eval2"
    ev = [f"ckpt_path={ckpt}", f"data.root={root}", "data.eval_batch_size=4", "data.num_workers=2", *FAST]
    # (its workers started from a forkserver, the default on a GPU: the entry module preloaded into it, per rank)
    run_cli("value_pl.eval", ev + DDP + ["data.worker_start=forkserver"], e2d, timeout=300)
    e2 = json.loads((e2d / "results.json").read_text())
    e1 = evaluate(compose(ev + [f"run_dir={tmp_path / 'eval1'}"], config_name="eval"))
    assert [(r["name"], r["val_acc"], r["test_acc"]) for r in e1["layers"]] == \
        [(r["name"], r["val_acc"], r["test_acc"]) for r in e2["layers"]]
    assert e1["pairs_evaluated"] == e2["pairs_evaluated"] == r1["pairs_evaluated"]
    # ... and the numbers of the run that wrote it (last.ckpt holds the last epoch, with every head's best snapshot)
    assert [(r["name"], r["val_acc"], r["test_acc"]) for r in e2["layers"]] == \
        [(r["name"], r["val_acc"], r["test_acc"]) for r in r2["layers"]]


def _loss_rank(rank, port, out):
    import torch

    from value_pl.probers.metrics import sum_over_ranks

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:  # rank 0: 3 pairs of loss 1.0; rank 1: 1 pair of loss 5.0, or nothing at all
        for r1 in ((torch.tensor(5.0), 1), (None, 0)):
            total, n = (torch.tensor(3.0), 3) if rank == 0 else r1
            t, m = sum_over_ranks(total, n, torch.device("cpu"))
            out.put((rank, float(t), m))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_the_logged_epoch_loss_is_the_mean_over_every_ranks_pairs():
    """The epoch loss (a sum over pairs and its count) is reduced over the ranks before it is logged: (3 + 5) / 4,
    not rank 0's 1.0; a rank with no pair joins with nothing."""
    import socket

    import torch.multiprocessing as mp

    from value_pl.probers.metrics import sum_over_ranks

    assert sum_over_ranks(None, 0, "cpu") == (None, 0.0)  # no process group: as it is
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_loss_rank, args=(port, out), nprocs=2, join=True, start_method="spawn")
    got = sorted(out.get(timeout=30) for _ in range(4))
    assert got == [(0, 3.0, 3.0), (0, 8.0, 4.0), (1, 3.0, 3.0), (1, 8.0, 4.0)]
