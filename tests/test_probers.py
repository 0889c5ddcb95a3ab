import pytest
import pytorch_lightning as pl
import torch
import webdataset as wds
from omegaconf import OmegaConf

from value_pl.backbones import build_backbone
from value_pl.data.collate import TaskSpec
from value_pl.data.schema import decode_sample, load_manifest
from value_pl.probers.heads import AttentionProber, LayerEmbProber
from value_pl.probers.module import ProbeModule


def test_eq4_layer_emb_hand_computed():
    h = LayerEmbProber(2, 2, num_classes=2, d=2)
    with torch.no_grad():
        h.W_w.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        h.W_mu.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
        h.w_cls.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    e_i, e_j = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    # W_w e_i = [1, 4]; W_mu e_j = [4, 7]; product [4, 28]; logits [32, -24]
    assert torch.equal(h(e_i, e_j), torch.tensor([[32.0, -24.0]]))
    assert h.W_w.bias is None and h.w_cls.bias is None


def test_eq3_attention_hand_computed():
    h = AttentionProber(num_heads=3, num_classes=2)
    with torch.no_grad():
        h.linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 0.5, 0.0, -1.0], [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]]))
    a_ij = torch.tensor([[0.1, 0.2, 0.3]])
    a_ji = torch.tensor([[0.4, 0.5, 0.6]])
    # class 0: 0.1+0.4+0.9 + 0.2+0-0.6 = 1.0 ; class 1: 0.2 + 0.4+0.5+0.6 = 1.7
    assert torch.allclose(h(a_ij, a_ji), torch.tensor([[1.0, 1.7]]))
    assert torch.equal(h.w, h.linear.weight[:, :3]) and torch.equal(h.mu, h.linear.weight[:, 3:])


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(OmegaConf.create({"family": "uniter", "path": "minilm", "seed": 0}), img_dim=64)


def _batches(backbone, demo_root, task, n=4, bs=8):
    man = load_manifest(demo_root)
    spec = TaskSpec(task, "region_region" if task.startswith("vr") else "phrase_region", man["labels"][task])
    col = backbone.collator(spec)
    url = str(demo_root / man["splits"]["train"]["shards"][0])
    samples = [s for _, s in zip(range(n * bs), wds.WebDataset(url, shardshuffle=False).map(decode_sample))]
    return spec, [col(samples[i * bs:(i + 1) * bs]) for i in range(n)]


def _fit(module, batches, steps):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


@pytest.mark.parametrize("prober,task,layer", [("layer_emb", "vrc", "layer_03"), ("attention", "vcc", "layer_02")])
def test_all_layers_in_one_pass_equals_one_layer_alone(backbone, demo_root, prober, task, layer):
    spec, batches = _batches(backbone, demo_root, task)
    task_d = {"name": spec.name, "kind": spec.kind, "labels": spec.labels}
    everything = ProbeModule(backbone, task_d, {"name": prober}, layers=None, seed=7)
    alone = ProbeModule(backbone, task_d, {"name": prober}, layers=[layer], seed=7)
    assert len(everything.head_names) > 1 and alone.head_names == [everything.head_names[[
        k.split(":")[1] for k in everything.head_names].index(layer)]]
    key = alone.head_names[0]
    before = {k: v.clone() for k, v in alone.head(key).state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in everything.head(key).state_dict().items())
    _fit(everything, batches, 4)
    _fit(alone, batches, 4)
    a, b = everything.head(key).state_dict(), alone.head(key).state_dict()
    assert any(not torch.equal(before[k], b[k]) for k in b)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_capture_reads_only_requested_rows(backbone, demo_root):
    spec, batches = _batches(backbone, demo_root, "vcd", n=1)
    m = ProbeModule(backbone, {"name": spec.name, "kind": spec.kind, "labels": spec.labels}, {"name": "attention"})
    cap = m.plan.capture(batches[0])
    out = backbone(batches[0], cap)
    full = backbone(batches[0], type(cap)(hidden=[], attn=None, rows=None))
    n_rows = out.attn["attn.joint.1.self"].shape[2]
    assert n_rows < full.attn["attn.joint.1.self"].shape[2]
    feats_rows = m.plan.inputs(out, batches[0], cap)
    feats_full = m.plan.inputs(full, batches[0])
    for k in feats_rows:
        for x, y in zip(feats_rows[k], feats_full[k]):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("prober,task", [("layer_emb", "vcd"), ("attention", "vcd"), ("attention", "vrc"),
                                         ("layer_emb", "vri")])
def test_stacked_inputs_equal_the_per_layer_reference(backbone, demo_root, prober, task):
    """The one-op gathers over all layers and pairs give exactly what the per-pair BackboneOutput API gives
    (mean over a phrase's tokens, max attention between spans), head by head."""
    spec, batches = _batches(backbone, demo_root, task, n=1, bs=16)
    batch = batches[0]
    m = ProbeModule(backbone, {"name": spec.name, "kind": spec.kind, "labels": spec.labels}, {"name": prober})
    cap = m.plan.capture(batch)
    out = backbone(batch, cap)
    got = m.per_head(m.plan.inputs(out, batch, cap))
    b, sa, sb = batch["pair_b"], batch["a_span"], batch["b_span"]
    ma, mb = ("text", "region") if task in ("vcd", "vcc") else ("region", "region")
    for l in m.plan.emb_layers:
        ea, eb = got["emb:" + l.name]
        torch.testing.assert_close(ea, out.embed(l.emb[0], b, ma, sa).float())
        torch.testing.assert_close(eb, out.embed(l.emb[1], b, mb, sb).float())
    for l in m.plan.attn_layers:
        fw = torch.cat([out.attention_between(ab, b, ma, sa, mb, sb) for ab, _ in l.attn], -1)
        bw = torch.cat([out.attention_between(ba, b, mb, sb, ma, sa) for _, ba in l.attn], -1)
        x, y = got["attn:" + l.name]
        torch.testing.assert_close(x, fw.float())
        torch.testing.assert_close(y, bw.float())
    assert len(got) == len(m.head_names) and b.numel() > 16


def test_a_layer_that_is_not_there_is_an_error_not_a_silent_drop(tmp_path):
    """layers=[1, 12] on a 2-layer model, or a typo (all_head), must not train just the layers that match."""
    from test_capture import tiny_uniter

    bb = tiny_uniter(tmp_path)
    task = {"name": "vrc", "kind": "region_region", "labels": ["a", "b"]}
    for prober, layers, bad in (("layer_emb", ["layer_01", "layer_12"], "layer_12"),
                                ("attention", ["layer_01", "all_head"], "all_head")):
        with pytest.raises(ValueError, match=rf"\['{bad}'\] are not layers of this backbone .*available: "):
            ProbeModule(bb, task=task, prober={"name": prober}, layers=layers)
    ProbeModule(bb, task=task, prober={"name": "attention"}, layers=["layer_01", "all_heads"])  # known names
    sent = {"name": "sentlen", "kind": "sentence", "labels": ["0", "1"]}
    with pytest.raises(ValueError, match=r"\['layer_07'\] are not layers of this backbone for sentence"):
        ProbeModule(bb, task=sent, prober={"name": "senteval_lr"}, layers=["layer_01", "layer_07"])


def test_both_probers_in_one_run_get_distinct_result_names(tmp_path):
    """prober "both" (Eq. 4 and Eq. 3 heads of every layer in one run) used to report two rows named layer_01
    (results.json, W&B val/acc/layer_01 logged twice: the attention head's value overwrote the Eq. 4 head's)."""
    from test_capture import tiny_uniter

    bb = tiny_uniter(tmp_path)
    task = {"name": "vrc", "kind": "region_region", "labels": ["a", "b"]}
    m = ProbeModule(bb, task=task, prober={"name": "both"})
    rows = m.layer_rows()
    names = [r["name"] for r in rows]
    assert len(set(names)) == len(names) == len(m.head_names)
    assert names == ["layer_00", "layer_01", "layer_02", "attn_layer_01", "attn_layer_02", "all_heads"]
    assert [r["layer"] for r in rows] == [0, 1, 2, -1, -1, -1]
    assert rows[3]["title"] == "Layer 1 (attention prober)"
    single = ProbeModule(bb, task=task, prober={"name": "attention"})  # one prober: the paper's layer names
    assert [single.display_name(k) for k in single.head_names] == ["layer_01", "layer_02", "all_heads"]


def test_a_checkpoint_evaluated_on_shards_of_another_width_says_so(tmp_path):
    """``eval`` of a prober trained where the image embedding follows the shards (MiniLM-UNITER, twins) on shards of
    another feature width rebuilds another backbone: the checksum error says why and what to pass (before, it only
    gave the two checksums)."""
    from test_capture import tiny_uniter

    from value_pl.probers.module import HEADS_FORMAT

    bb = tiny_uniter(tmp_path)
    task = {"name": "vrc", "kind": "region_region", "labels": ["a", "b"]}
    m = ProbeModule(bb, task=task, prober={"name": "layer_emb"})
    trained = dict(bb.describe(), checksum="0" * 16, img_dim=2048)
    with pytest.raises(ValueError, match=r"2048-d region features.*64-d.*data.root"):
        m.on_load_checkpoint({"value_pl": {"heads_format": HEADS_FORMAT, "backbone_identity": trained}})
    with pytest.raises(ValueError, match=r"checksum 0{16}, but the backbone built now has checksum") as e:
        m.on_load_checkpoint({"value_pl": {"heads_format": HEADS_FORMAT,
                                           "backbone_identity": dict(bb.describe(), checksum="0" * 16)}})
    assert "region features" not in str(e.value)
