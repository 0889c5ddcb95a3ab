"""The batched SentEval grid (value_pl/protocols/batched.py) against SentEval's loop, one configuration at a time.

Without dropout the batched run follows each configuration's own trajectory (same initial weights, same
permutations, same Adam update): the selected configuration, dev/test accuracies and pass counts are equal and
the weights agree to 1e-5. With dropout the masks come from another random stream; there the gradient with a
given mask is checked against autograd, and the mask's keep rate against 1 - p.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose
from tasks_helpers import FAST_DATA, one_thread, sentence_shards, tiny_backbones

from value_pl.probers.heads import SentenceProber
from value_pl.protocols.batched import StopRule, Unit, _adam_ops, _Bank, _Dropout, train_units, unit_of
from value_pl.protocols.fitting import fit_head
from value_pl.protocols.mdl import online_codelength, online_codelength_batched
from value_pl.protocols.senteval import fit_senteval, init_prober, probe_layer, probe_layers

D, C = 12, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def seeded_task(n, seed=0, layers=2):
    """A learnable 3-class task; layer 1 carries a noisier copy of the signal than layer 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, C, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, D, generator=g)
    y = (x @ w + 0.7 * torch.randn(n, C, generator=g)).argmax(1)
    xs = [x + 0.5, 0.5 * x + 0.8 * torch.randn(n, D, generator=g)][:layers]
    return xs, y


TR, VA, TE = seeded_task(200, 0), seeded_task(100, 1), seeded_task(100, 2)
OPTS = {"lr": 1e-3, "batch_size": 64, "tenacity": 2, "epoch_size": 2, "max_epoch": 16}


def test_grid_selects_what_each_configuration_alone_selects():
    grid = [{"nhid": h, "dropout": 0.0, "l2": wd} for h in (8, 16, 0) for wd in (1e-5, 3e-2)]
    seq = [probe_layer(TR[0][k], TR[1], VA[0][k], VA[1], TE[0][k], TE[1], C, grid, OPTS, 7, f"sent:{k}")
           for k in range(2)]
    bat = probe_layers(TR, VA, TE, C, grid, OPTS, 7, ["sent:0", "sent:1"])
    for s, b in zip(seq, bat):
        assert {k: b[k] for k in ("nhid", "dropout", "l2", "val_acc", "test_acc", "passes")} == \
               {k: s[k] for k in ("nhid", "dropout", "l2", "val_acc", "test_acc", "passes")}
        assert b["grid"] == s["grid"]  # every configuration: the same best dev accuracy and number of passes
    assert len({(r["nhid"], r["l2"]) for r in bat[0]["grid"]}) == 6


@pytest.mark.parametrize("by_nhid", [True, False])
def test_weights_follow_the_sequential_trajectory_and_early_stop_keeps_best_state(by_nhid):
    """A heavily decayed configuration stops early and keeps its best-dev weights while the others train on
    (banks per (layer, nhid), as on CPU, or one bank per layer, as on GPU)."""
    hps = [{"nhid": 8, "dropout": 0.0, "l2": 5.0}, {"nhid": 8, "dropout": 0.0, "l2": 1e-5},
           {"nhid": 0, "dropout": 0.0, "l2": 1e-4}]
    opts = {**OPTS, "max_epoch": 24}
    units = [Unit(0, hp["nhid"], 0.0, hp["l2"], init_prober(D, C, hp, 3, "k").state_dict()) for hp in hps]
    rule = StopRule("acc", opts["tenacity"], opts["epoch_size"], opts["max_epoch"], senteval=True)
    out = train_units(TR[0], TR[1], VA[0], VA[1], units, C, rule=rule, seed=3, bank_by_nhid=by_nhid)
    passes = [r["passes"] for r in out]
    assert passes[0] < opts["max_epoch"] and max(passes[1:]) > passes[0], passes
    for hp, r in zip(hps, out):
        clf, acc, n = fit_senteval(init_prober(D, C, hp, 3, "k"), TR[0][0], TR[1], VA[0][0], VA[1], l2=hp["l2"],
                                   seed=3, tenacity=2, epoch_size=2, max_epoch=24)
        assert (r["score"], r["passes"]) == (acc, n)
        for k, v in clf.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-4)


def senteval_fit(dev_accs, tenacity, epoch_size, max_epoch):
    """SentEval's ``PyTorchClassifier.fit`` loop, transcribed line for line, on scripted dev accuracies: (best dev
    accuracy, passes)."""
    accs = iter(dev_accs)
    nepoch, bestaccuracy, stop_train, early_stop_count = 0, -1, False, 0
    while not stop_train and nepoch <= max_epoch:
        nepoch += epoch_size  # trainepoch
        accuracy = next(accs)
        if accuracy > bestaccuracy:
            bestaccuracy = accuracy
        else:
            if early_stop_count >= tenacity:
                stop_train = True
            early_stop_count += 1
    return bestaccuracy, nepoch


# dev curves: noisy with late gains (SentEval's counter is never reset: stops at the 3rd non-improving evaluation
# overall, where a consecutive rule would train on), flat, improving to the end, improving then flat
CURVES = [[0.50, 0.40, 0.55, 0.45, 0.60, 0.50, 0.65, 0.55, 0.70, 0.60, 0.75, 0.62, 0.80],
          [0.3] * 13, [0.1 * k for k in range(1, 14)], [0.2, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]]


@pytest.mark.parametrize("curve", range(len(CURVES)))
def test_sequential_fit_stops_as_senteval_does(curve, monkeypatch):
    import value_pl.protocols.senteval as se

    accs = iter(CURVES[curve])
    monkeypatch.setattr(se, "accuracy", lambda *a, **k: next(accs))
    hp = {"nhid": 0, "dropout": 0.0, "l2": 0.0}
    _, best, passes = fit_senteval(init_prober(D, C, hp, 3, "k"), TR[0][0], TR[1], VA[0][0], VA[1], l2=0.0, seed=3,
                                   tenacity=2, epoch_size=2, max_epoch=20)
    assert (best, passes) == senteval_fit(CURVES[curve], 2, 2, 20)
    if curve == 0:
        assert passes == 12  # a reset-on-improvement rule with tenacity 2 would train all 22 passes
    if curve == 2:
        assert passes == 22  # every evaluation improves: SentEval trains while nepoch <= max_epoch


@pytest.mark.parametrize("curve", range(len(CURVES)))
def test_batched_units_stop_as_senteval_does(curve, monkeypatch):
    """The batched grid's stopping rule (``StopRule(senteval=True)``) on the same scripted dev curves, two units of
    one bank on two curves: each unit stops where SentEval's loop stops on its curve."""
    curves = {0: CURVES[curve], 1: CURVES[(curve + 1) % len(CURVES)]}
    calls = iter(range(100))

    def score(self, x, y, metric, batch):
        k = next(calls)
        return [curves[u][k] for u in self.ids]

    monkeypatch.setattr(_Bank, "score", score)
    hp = {"nhid": 0, "dropout": 0.0, "l2": 0.0}
    units = [Unit(0, 0, 0.0, 0.0, init_prober(D, C, hp, 3, "k").state_dict()) for _ in range(2)]
    out = train_units(TR[0], TR[1], VA[0], VA[1], units, C, rule=StopRule("acc", 2, 2, 20, senteval=True), seed=3)
    for u, r in enumerate(out):
        # the bank is scored once per evaluation while a unit trains: at evaluation k unit u sees curves[u][k]
        assert (r["score"], r["passes"]) == senteval_fit(curves[u], 2, 2, 20), (u, r["score"], r["passes"])


def test_stop_rules():
    plain, se = StopRule("acc", 2, 4, 200), StopRule("acc", 2, 4, 200, senteval=True)
    assert plain.pass_cap() == 200 and se.pass_cap() == 204 and StopRule("acc", 5, 4, 10, senteval=True).pass_cap() == 12
    assert plain.trains_on(196) and not plain.trains_on(200) and se.trains_on(200) and not se.trains_on(204)
    assert plain.stops(0) == (False, 1) and plain.stops(1) == (True, 2)
    assert se.stops(1) == (False, 2) and se.stops(2) == (True, 3)


def test_banks_in_parallel_threads_give_the_same_result():
    """With two torch threads the banks run in two worker threads: the same numbers, bit for bit."""
    hps = [{"nhid": h, "dropout": p, "l2": 1e-4} for h in (8, 16, 0) for p in (0.0, 0.2)]
    units = [Unit(k, hp["nhid"], hp["dropout"], hp["l2"], init_prober(D, C, hp, 3, f"k{k}").state_dict())
             for k in range(2) for hp in hps]
    rule = StopRule("acc", 2, 2, 8)
    one = train_units(TR[0], TR[1], VA[0], VA[1], units, C, rule=rule, seed=3)
    torch.set_num_threads(2)
    try:
        two = train_units(TR[0], TR[1], VA[0], VA[1], units, C, rule=rule, seed=3)
    finally:
        torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    for a, b in zip(one, two):
        assert (a["score"], a["passes"]) == (b["score"], b["passes"])
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k])


def test_dropout_gradient_and_mask_rate():
    hps = [(16, 0.0), (16, 0.2), (16, 0.1), (0, 0.0)]
    units = [Unit(0, h, p, 0.0, SentenceProber(D, C, h, p).state_dict()) for h, p in hps]
    init = {i: (list(u.init.values()), [torch.zeros_like(t) for t in u.init.values()],
                [torch.zeros_like(t) for t in u.init.values()]) for i, u in enumerate(units)}
    bank = _Bank(list(range(4)), units, C, D, init, torch.device("cpu"))
    x, y = TR[0][0][:64], TR[1][:64]
    bank.grads(x, F.one_hot(y, C).t().float(), _Dropout(5, (0, 16), torch.device("cpu")))
    g = bank.groups[0]
    assert [bank.ids[j] for j in range(g.j0, len(g.ids))] == [1, 2]  # dropout units last, grid order kept
    mask = _Dropout(5, (0, 16), torch.device("cpu")).mask(g, 64)  # the same draw
    for i, u in enumerate(bank.ids):
        clf = SentenceProber(D, C, units[u].nhid, units[u].dropout)
        clf.load_state_dict(units[u].init)
        if units[u].nhid:
            m = mask[i - g.j0].t() if i >= g.j0 else 1.0
            logits = clf.net[3](torch.sigmoid(clf.net[0](x) * m))
        else:
            logits = clf(x)
        F.cross_entropy(logits, y).backward()
        for a, p in zip(bank.gv[i], clf.parameters()):
            torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
    big = _Dropout(1, (0, 16), torch.device("cpu")).mask(g, 20000)
    for j, p in enumerate((0.2, 0.1)):
        kept = (big[j] > 0).float().mean().item()
        assert abs(kept - (1 - p)) < 0.005 and torch.allclose(big[j][big[j] > 0], torch.tensor(1 / (1 - p)))


def test_adam_fallback_equals_torch_adam():
    p0 = torch.randn(5, 4)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=1e-3, weight_decay=1e-2)
    p, m, v = p0.clone(), torch.zeros(5, 4), torch.zeros(5, 4)
    for t in range(1, 6):
        g = torch.randn(5, 4, generator=torch.Generator().manual_seed(t))
        ref.grad = g.clone()
        opt.step()
        _adam_ops([p], [g.clone()], [m], [v], t, 1e-3, 1e-2)
    torch.testing.assert_close(p, ref.detach(), atol=1e-7, rtol=1e-6)


def test_mdl_batched_equals_per_head_code():
    heads = [SentenceProber(D, C, 8, 0.0), SentenceProber(D, C, 0, 0.0)]
    xs, y = TR
    fr = (0.05, 0.2, 0.5, 1.0)
    fit = {"lr": 1e-2, "batch_size": 32, "max_epochs": 6, "patience": 2}
    bat = online_codelength_batched(heads, xs, y, C, fr, seed=4, **fit)
    for h, x, b in zip(heads, xs, bat):
        s = online_codelength(h, (x,), y, C, fr, seed=4, **fit)
        assert [blk["epochs"] for blk in b["blocks"][1:]] == [blk["epochs"] for blk in s["blocks"][1:]]
        assert b["codelength_bits"] == pytest.approx(s["codelength_bits"], rel=1e-4)
    out = train_units(xs, y, VA[0], VA[1], [unit_of(h, k) for k, h in enumerate(heads)], C, lr=1e-2, batch_size=32,
                      rule=StopRule("loss", 2, 1, 6, 1e-6), seed=4)
    full, epochs = fit_head(copy.deepcopy(heads[1]), (xs[1],), y, (VA[0][1],), VA[1], lr=1e-2, batch_size=32,
                            max_epochs=6, patience=2, seed=4)
    assert out[1]["passes"] == epochs
    for k, v in full.state_dict().items():
        torch.testing.assert_close(out[1]["state"][k], v, atol=1e-5, rtol=1e-4)


def test_progress_bar_counts_configs_still_training(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    hps = [{"nhid": 8, "dropout": 0.0, "l2": 5.0}, {"nhid": 0, "dropout": 0.0, "l2": 1e-5}]
    units = [Unit(0, hp["nhid"], 0.0, hp["l2"], init_prober(D, C, hp, 3, "k").state_dict()) for hp in hps]
    train_units(TR[0], TR[1], VA[0], VA[1], units, C, rule=StopRule("acc", 2, 2, 8), seed=3, progress=True,
                desc="grid")
    err = capsys.readouterr().out
    assert "grid" in err and "training=" in err and "16/16" in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sent_batched")
    return tiny_backbones(d / "bb")["SS"], sentence_shards(d / "senteval")


def test_driver_writes_timing_and_selected_configs(tiny_run, tmp_path):
    from value_pl.driver.train import train

    bb, root = tiny_run
    cfg = compose(["task=sentlen", "prober=senteval_mlp", f"data.root={root}", *bb, "logger=none",
                   "progress=false", "prober.grid.nhid=[8]", "prober.grid.dropout=[0.0,0.1]",
                   "prober.grid.l2=[1e-4,1e-2]", "prober.epoch_size=1", "prober.max_epoch=3", "prober.tenacity=1",
                   *FAST_DATA, f"run_dir={tmp_path}"])
    res = train(cfg)
    disk = json.loads((tmp_path / "results.json").read_text())
    assert set(disk["timing"]) == {"extract_s", "probe_s"} and disk["timing"]["probe_s"] > 0
    assert disk["protocol"]["grid_size"] == 4 and len(disk["layers"]) == 3
    for row in disk["layers"]:
        assert len(row["grid"]) == 4
        first_best = max(row["grid"], key=lambda r: r["val_acc"])
        assert {k: row[k] for k in ("nhid", "dropout", "l2", "val_acc")} == \
               {k: first_best[k] for k in ("nhid", "dropout", "l2", "val_acc")}
    assert res["layers"] == disk["layers"]


def test_mdl_driver_batches_sentence_heads(tiny_run, tmp_path):
    from value_pl.driver.train import train

    bb, root = tiny_run
    cfg = compose(["task=sentlen", "prober=senteval_mlp", f"data.root={root}", *bb, "logger=none", "progress=false",
                   "mdl=true", "mdl_opts.max_epochs=3", "mdl_opts.fractions=[0.1,0.5,1.0]", *FAST_DATA,
                   f"run_dir={tmp_path}"])
    res = train(cfg)
    assert set(res["timing"]) == {"extract_s", "probe_s"}
    assert [r["name"] for r in res["layers"]] == ["layer_00", "layer_01", "layer_02"]
    for r in res["layers"]:
        assert [b["end"] for b in r["blocks"]] == [10, 48, 96] and r["codelength_bits"] > 0
        assert 0 <= r["test_acc"] <= 1
