"""The geometry-only control row (``geometry_baseline=true`` / ``layers=[..., boxes]``): Eq. 4 on the regions' boxes
alone, on a small Visual Genome set built by the real builder, with the predicate planted in the boxes or not."""
from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from fixtures_data import _o, _r, _reg, build, write_vg_small

from conftest import compose
from tasks_helpers import one_thread, tiny_backbones

W, H = 800, 600
PREDS = ("on", "under")
FIT = ["logger=none", "trainer.enable_progress_bar=false", "data.batch_size=16", "data.eval_batch_size=32",
       "data.shuffle_buffer=1", "data.num_workers=0", "optim.lr=0.02"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def write_relations(root, n_images: int = 80, per_image: int = 3, planted: bool = True, seed: int = 0) -> dict:
    """VG inputs: each region's caption relates two objects; its predicate ``on`` puts the subject above the object
    and ``under`` below it (``planted``), or the predicate is drawn independently of two random boxes. Detections
    sit on the objects (plus two background boxes), so every object is a region."""
    rng = np.random.default_rng(seed)
    graphs, dets, oid = [], {}, 1
    for iid in range(1, n_images + 1):
        regions, boxes = [], []
        for k in range(per_image):
            pred = PREDS[int(rng.integers(2))]
            w, h = rng.uniform(60, 140), rng.uniform(40, 90)
            x, y = rng.uniform(10 + 240 * k, 100 + 240 * k), rng.uniform(200, 300)
            if planted:
                dy = rng.uniform(1.1, 2.0) * h * (1 if pred == "on" else -1)  # object below (on) / above (under)
                xo, yo = x + rng.uniform(-20, 20), y + dy
            else:
                xo, yo = rng.uniform(10 + 240 * k, 100 + 240 * k), rng.uniform(60, 450)
            s, o = _o(oid, "cup", x, y, w, h), _o(oid + 1, "table", xo, yo, w, h)
            regions.append(_reg(iid, 100 * iid + k, f"cup {pred} table", [s, o], [_r(oid, pred, oid, oid + 1)]))
            boxes += [[b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]] for b in (s, o)]
            oid += 2
        graphs.append({"image_id": iid, "regions": regions})
        dets[iid] = boxes + [[W - 60, H - 50, W - 1, H - 1], [0, 0, 50, 40]]
    ids = list(range(1, n_images + 1))
    n_tr, n_va = int(0.6 * n_images), int(0.2 * n_images)
    splits = {"train": ids[:n_tr], "val": ids[n_tr:n_tr + n_va], "test": ids[n_tr + n_va:]}
    return write_vg_small(root, graphs, {i: (W, H) for i in ids}, splits, dets, {"dataset.top_k": "2"})


@pytest.fixture(scope="module")
def bbs(tmp_path_factory):
    return tiny_backbones(tmp_path_factory.mktemp("tiny_bb"))


@pytest.fixture(scope="module")
def vg_sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("geo")
    out = {}
    for planted in (True, False):
        name = "planted" if planted else "random"
        man = build("vg", d / name, write_relations(d / f"{name}_in", planted=planted))
        assert man["labels"]["vrc"] == list(PREDS) or sorted(man["labels"]["vrc"]) == sorted(PREDS)
        out[name] = d / name
    return out


def _train(overrides, run_dir):
    from value_pl.driver.train import train

    return train(compose([*overrides, f"run_dir={run_dir}"]))


def _row(res, name):
    return next(r for r in res["layers"] if r["name"] == name)


# ---------------------------------------------------------------------------------------------- encoding
def test_every_box_mode_starts_with_the_normalised_corners():
    """``box_geometry`` reads the first four columns of any box mode: the same 8 numbers for every backbone."""
    from value_pl.data.collate import BOX_DIMS, GEOMETRY, box_geometry, encode_boxes

    boxes = np.array([[10, 20, 110, 220], [0, 0, 800, 600]], np.float32)
    geo = {m: box_geometry(torch.from_numpy(encode_boxes(boxes, W, H, m))) for m in BOX_DIMS}
    first = next(iter(geo.values()))
    assert first.shape == (2, len(GEOMETRY)) == (2, 8)
    for g in geo.values():
        assert torch.equal(g, first)
    x1, y1, x2, y2 = 10 / W, 20 / H, 110 / W, 220 / H
    torch.testing.assert_close(first[0], torch.tensor([1, x1, y1, x2, y2, x2 - x1, y2 - y1, (x2 - x1) * (y2 - y1)]))
    torch.testing.assert_close(first[1, 5:], torch.ones(3))


def test_phrase_side_is_the_constant_alone():
    """Phrase-region pairs: the phrase has no geometry, so side a is ``[1, 0, ..., 0]`` and Eq. 4 is a linear map of
    the region's geometry; region-region pairs get both regions' geometry."""
    from value_pl.probers.features import pair_geometry

    rb = torch.rand(2, 3, 7)
    batch = {"region_boxes": rb, "pair_b": torch.tensor([0, 1, 1]), "a_pos": torch.tensor([[4, 5], [0, 1], [2, 3]]),
             "b_pos": torch.tensor([[2], [0], [1]])}
    ea, eb = pair_geometry(batch, "phrase_region")
    assert ea.shape == eb.shape == (1, 3, 8)
    assert torch.equal(ea[0], torch.eye(8)[0].expand(3, 8))
    assert torch.equal(eb[0, :, 1:5], rb[[0, 1, 1], [2, 0, 1], :4])
    batch["a_pos"] = torch.tensor([[1], [2], [0]])
    ea, _ = pair_geometry(batch, "region_region")
    assert torch.equal(ea[0, :, 1:5], rb[[0, 1, 1], [1, 2, 0], :4])


def test_boxes_is_a_layer_name_and_needs_no_forward(bbs, vg_sets):
    """``layers=[boxes]`` alone: one control head, no backbone forward (its inputs are in the batch); a name that is
    no layer still lists ``boxes`` among the available ones."""
    from value_pl.driver.setup import build_module, make_datamodule

    cfg = compose(["task=vrc", "prober=layer_emb", f"data.root={vg_sets['planted']}", *bbs["SS"], "layers=[boxes]",
                   *FIT])
    module, _ = build_module(cfg, make_datamodule(cfg))
    assert module.head_names == ["emb:boxes"] and not module.plan.needs_forward
    cfg = compose(["task=vrc", "prober=layer_emb", f"data.root={vg_sets['planted']}", *bbs["SS"], "layers=[boxs]"])
    with pytest.raises(ValueError, match=r"boxs.*available.*'raw', 'boxes'"):
        build_module(cfg, make_datamodule(cfg))


# ------------------------------------------------------------------------------------------ learning
@pytest.mark.slow
@pytest.mark.parametrize("planted", [True, False])
def test_boxes_row_learns_a_planted_geometry_and_stays_at_chance_otherwise(planted, bbs, vg_sets, tmp_path):
    """VRC with the predicate planted in the boxes: the boxes row reads it; drawn independently of the boxes: it
    stays near chance (2 classes) -- on shards built by the real VG builder."""
    root = vg_sets["planted" if planted else "random"]
    fit = [x for x in FIT if x != "logger=none"] + ["logger=csv"]
    res = _train(["task=vrc", "prober=layer_emb", f"data.root={root}", *bbs["SS"], "layers=[1]",
                  "geometry_baseline=true", "trainer.max_epochs=25", *fit], tmp_path)
    names = [r["name"] for r in res["layers"]]
    assert names == ["layer_01", "boxes"]
    box = _row(res, "boxes")
    assert box["title"] == "Box geometry only (control)" and box["layer"] == -1
    assert res["best"]["name"] == "layer_01"  # a control row is never the run's best layer
    assert res["pairs_evaluated"]["test"] >= 40
    if planted:
        assert box["test_acc"] > 0.9 and box["val_acc"] > 0.9
    else:
        assert abs(box["test_acc"] - 0.5) < 0.2 and box["test_acc"] <= res["majority"] + 0.15
    # the CSV log has the row's curve; the checkpoint monitor val/acc/best follows the layers, not the control
    with open(tmp_path / "csv" / "metrics.csv") as f:
        val = [r for r in csv.DictReader(f) if r.get("val/acc/layer_01")]
    assert len(val) == 25 and all(r["val/acc/boxes"] for r in val)
    assert [float(r["val/acc/best"]) for r in val] == pytest.approx([float(r["val/acc/layer_01"]) for r in val])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert _row(saved, "boxes")["title"] == "Box geometry only (control)"
    assert "Box geometry only (control)" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_boxes_row_does_not_depend_on_the_backbone(bbs, vg_sets, tmp_path):
    """Single-stream (uniter7 boxes, 100 regions) and two-stream (xyxy4 boxes, 36 regions) backbones, one seed: the
    boxes row's inputs and numbers are the same."""
    from value_pl.driver.setup import build_module, make_datamodule

    root = vg_sets["planted"]
    inputs, rows = {}, {}
    for kind in ("SS", "TS"):
        ov = ["task=vrc", "prober=layer_emb", f"data.root={root}", *bbs[kind], "layers=[boxes]",
              "trainer.max_epochs=3", *FIT]
        cfg = compose(ov)
        dm = make_datamodule(cfg)
        module, _ = build_module(cfg, dm)
        batch = next(iter(dm.loader("test", train=False)))
        inputs[kind] = module.extract_inputs(batch)["boxes"]
        rows[kind] = _row(_train(ov, tmp_path / kind), "boxes")
    for a, b in zip(inputs["SS"], inputs["TS"]):
        assert torch.equal(a, b)
    assert rows["SS"] == rows["TS"]


@pytest.mark.slow
def test_eval_from_a_checkpoint_restores_the_boxes_row(bbs, vg_sets, tmp_path):
    from value_pl.driver.train import evaluate

    root = vg_sets["planted"]
    res = _train(["task=vrc", "prober=layer_emb", f"data.root={root}", *bbs["SS"], "layers=[1]",
                  "geometry_baseline=true", "trainer.max_epochs=2", *FIT], tmp_path / "run")
    ev = evaluate(compose([f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}", f"data.root={root}",
                           *bbs["SS"], "logger=none", "trainer.enable_progress_bar=false",
                           f"run_dir={tmp_path / 'eval'}"], config_name="eval"))
    assert [r["name"] for r in ev["layers"]] == [r["name"] for r in res["layers"]] == ["layer_01", "boxes"]
    assert _row(ev, "boxes")["test_acc"] == pytest.approx(_row(res, "boxes")["test_acc"])


@pytest.mark.slow
def test_cached_boxes_row_equals_online(bbs, vg_sets, tmp_path):
    """The feature cache stores the boxes head's inputs like any head's: a cached run gives the online numbers."""
    from value_pl.driver.extract import extract_cache

    common = ["task=vrc", "prober=layer_emb", f"data.root={vg_sets['planted']}", *bbs["SS"], "layers=[1]",
              "geometry_baseline=true", "trainer.max_epochs=2", *FIT]
    online = _train(common, tmp_path / "online")
    cache = tmp_path / "cache"
    man = extract_cache(compose(common + [f"cache.root={cache}", "cache.dtype=float32",
                                          f"run_dir={tmp_path / 'x'}"], config_name="extract"))
    assert "emb:boxes" in man["cache"]["heads"]
    cached = _train(common + [f"data.cache={cache}"], tmp_path / "cached")
    assert _row(cached, "boxes")["test_acc"] == pytest.approx(_row(online, "boxes")["test_acc"])


def test_phrase_region_runs_report_the_boxes_row(bbs, demo_root, tmp_path):
    """VCC (phrase-region): the boxes row is the region's geometry through the Eq. 4 head with a constant phrase
    side; a fast_dev_run reports it beside the layers."""
    res = _train(["task=vcc", "prober=layer_emb", f"data.root={demo_root}", *bbs["SS"], "geometry_baseline=true",
                  "trainer.fast_dev_run=true", *FIT], tmp_path)
    names = [r["name"] for r in res["layers"]]
    assert names[-1] == "boxes" and "layer_01" in names
    assert _row(res, "boxes")["title"] == "Box geometry only (control)"


# --------------------------------------------------------------------------------------------- report
def _run(task, rows, seed=0):
    return {"task": task, "prober": "layer_emb", "seed": seed, "chance": 0.5, "backbone": {"family": "uniter",
            "name": "uniter-base", "pretrained": True, "checksum": "x"}, "data": {"root": "shards/vg"},
            "control": False, "layers": [{"name": n, "layer": -1 if n in ("raw", "boxes") else int(n[-2:]),
                                          "test_acc": a, "val_acc": a} for n, a in rows.items()]}


def test_report_labels_the_boxes_row_as_a_control(tmp_path):
    from value_pl.report import build_tables, write_tables

    runs = [_run(t, {"layer_01": 0.7 + 0.01 * s, "layer_05": 0.8, "layer_12": 0.75, "raw": 0.6, "boxes": 0.9},
                 seed=s) for t in ("vri", "vcc") for s in (0, 1)]
    for r in runs:
        if r["task"] == "vcc":
            r["layers"] = [x for x in r["layers"] if x["name"] != "raw"]
    tables = {t.name: t for t in build_tables(runs, "table3,table9")}
    t9 = tables["table9"]
    assert t9.rows[:3] == ["Original visual emb.", "Box geometry only (control)", "Layer 1"]
    t3 = tables["table3"]
    assert t3.rows.index("Box geometry only (control)") < t3.rows.index("Layer 1")
    write_tables(list(tables.values()), tmp_path, len(runs), "table3,table9")
    md = (tmp_path / "report-table3-table9.md").read_text()
    assert "| Box geometry only (control) |" in md and "90.00" in md


def test_baseline_switches_on_an_attention_only_run_are_said(bbs, vg_sets, caplog):
    """``prober=attention`` trains no Eq. 4 head, so ``raw_baseline``/``geometry_baseline`` add no row there (the
    fig4 sweep sets them for every prober): the run says so instead of dropping them silently."""
    from value_pl.driver.setup import build_module, make_datamodule

    cfg = compose(["task=vrc", "prober=attention", f"data.root={vg_sets['planted']}", *bbs["SS"],
                   "raw_baseline=true", "geometry_baseline=true", *FIT])
    with caplog.at_level(logging.WARNING, logger="value_pl"):
        module, _ = build_module(cfg, make_datamodule(cfg))
    assert not module.plan.raw and not module.plan.boxes
    msg = [r.getMessage() for r in caplog.records if "no such row" in r.getMessage()]
    assert msg and "raw_baseline=true, geometry_baseline=true" in msg[0] and "prober=attention" in msg[0]
    caplog.clear()
    cfg = compose(["task=vrc", "prober=layer_emb", f"data.root={vg_sets['planted']}", *bbs["SS"], "raw_baseline=true",
                   "geometry_baseline=true", *FIT])
    with caplog.at_level(logging.WARNING, logger="value_pl"):
        module, _ = build_module(cfg, make_datamodule(cfg))
    assert module.plan.raw and module.plan.boxes
    assert not [r for r in caplog.records if "no such row" in r.getMessage()]
