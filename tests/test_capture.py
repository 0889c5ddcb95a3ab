"""Row capture: the forward keeps sdpa, and the captured rows equal the rows of the full eager maps."""
import pytest
import torch
from omegaconf import OmegaConf

from test_cache import small_demo


def tiny_uniter(tmp_path, hidden=32, layers=2, heads=2):
    import json

    from value_pl.backbones.uniter import build_uniter

    p = tmp_path / "tiny.json"
    p.write_text(json.dumps({"vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers,
                             "num_attention_heads": heads, "intermediate_size": 2 * hidden,
                             "max_position_embeddings": 128, "type_vocab_size": 2}))
    return build_uniter(OmegaConf.create({"name": "tiny", "pretrained": False, "config": str(p),
                                          "tokenizer": "minilm", "seed": 3}), img_dim=64)


def demo_batch(tmp_path, bb, task="vrc", prober="attention", n=12):
    from value_pl.data.datamodule import ShardDataModule
    from value_pl.probers.module import ProbeModule

    root = tmp_path / "demo"
    if not root.exists():
        small_demo(root, splits={"train": 4, "val": n, "test": 4})
    dm = ShardDataModule(root, eval_batch_size=n)
    labels = dm.manifest["labels"][task]
    kind = {"vrc": "region_region", "vri": "region_region", "vcd": "phrase_region", "vcc": "phrase_region"}[task]
    module = ProbeModule(bb, task={"name": task, "kind": kind, "labels": labels}, prober={"name": prober})
    from value_pl.data.collate import TaskSpec

    dm.collate = bb.collator(TaskSpec(task, kind, labels))
    return module, next(iter(dm.val_dataloader()))


def eager_maps(bb, batch):
    """Full N x N maps from transformers' eager attention (output of BertSelfAttention), per layer."""
    maps, hooks = {}, []
    for i, layer in enumerate(bb.uniter.encoder.layer):
        def hook(_m, _i, out, name=f"attn.joint.{i + 1}.self"):
            maps[name] = out[1]
        hooks.append(layer.attention.self.register_forward_hook(hook))
    old = bb.config._attn_implementation
    bb.config._attn_implementation = "eager"
    try:
        from value_pl.backbones.capture import CaptureSpec

        out = bb(batch, CaptureSpec(hidden=[], attn=[], full_forward=True))
    finally:
        bb.config._attn_implementation = old
        for h in hooks:
            h.remove()
    return out, maps


@pytest.mark.parametrize("task", ["vrc", "vcd"])
def test_rows_equal_eager_maps_and_forward_keeps_sdpa(tmp_path, monkeypatch, task):
    bb = tiny_uniter(tmp_path)
    module, batch = demo_batch(tmp_path, bb, task)
    spec = module.plan.capture(batch)
    assert spec.rows is not None

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        out = bb(batch, spec)
    assert len(calls) == bb.num_layers  # the forward itself ran sdpa in every layer
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)

    with torch.no_grad():
        _, full = eager_maps(bb, batch)
    rows = out.rows["joint"]  # (B, R) positions, -1 padded
    N = batch["input_ids"].shape[1] + batch["region_mask"].shape[1]
    assert rows.shape[1] < N
    for name, a in full.items():
        got = out.attn[name]
        assert got.shape[:3] == (a.shape[0], a.shape[1], rows.shape[1]) and got.shape[3] == N
        ref = torch.gather(a, 2, rows.clamp(min=0)[:, None, :, None].expand(-1, a.shape[1], -1, N))
        valid = (rows >= 0)[:, None, :, None].expand_as(ref)
        torch.testing.assert_close(got[valid], ref[valid].float(), atol=1e-6, rtol=1e-5)
        assert bool((got[~valid] == 0).all())

    # the prober's inputs from captured rows == those read from the full eager maps
    full_out = out.__class__(**{**out.__dict__, "attn": full, "rows": {}})
    f_rows = module.plan.inputs(out, batch)
    f_full = module.plan.inputs(full_out, batch)
    assert f_rows.keys() == f_full.keys() and f_rows
    for k in f_rows:
        for x, y in zip(f_rows[k], f_full[k]):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_forward_stops_after_the_last_requested_layer(tmp_path, monkeypatch):
    """A probe of layer 1 does not pay for the layers above it; full_forward=True runs them all."""
    from value_pl.backbones.capture import CaptureSpec

    bb = tiny_uniter(tmp_path)
    _, batch = demo_batch(tmp_path, bb, "vrc")
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        part = bb(batch, CaptureSpec(hidden=["hidden.joint.1"], attn=[]))
        n_part = len(calls)
        full = bb(batch, CaptureSpec(hidden=["hidden.joint.1"], attn=[], full_forward=True))
    assert n_part == 1 and len(calls) - n_part == bb.num_layers > 1
    assert list(part.hidden) == ["hidden.joint.1"]
    torch.testing.assert_close(part.hidden["hidden.joint.1"], full.hidden["hidden.joint.1"])


def test_layers_run_as_their_two_halves_exactly(tmp_path, monkeypatch):
    """run_layer's fast path (attention, then feed_forward_chunk) equals the layer's own forward bit for bit and
    skips transformers' per-call inspect.signature (apply_chunking_to_forward)."""
    import transformers.models.bert.modeling_bert as mb

    from value_pl.backbones.capture import additive_mask
    from value_pl.backbones.common import run_layer

    bb = tiny_uniter(tmp_path, layers=3)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 9)
    mask[1, 5:] = 0
    bias4 = additive_mask(mask, torch.float32)[:, None, None, :]
    hs = [torch.randn(4, 9, 32, generator=g)]
    with torch.no_grad():
        ref = [layer(hs[0], attention_mask=bias4) for layer in bb.uniter.encoder.layer]

        def forbidden(*a, **k):
            raise AssertionError("the fast path must not call apply_chunking_to_forward")

        monkeypatch.setattr(mb, "apply_chunking_to_forward", forbidden)
        got = [run_layer(layer, hs[0], bias4) for layer in bb.uniter.encoder.layer]
    for r, x in zip(ref, got):
        assert torch.equal(r[0] if isinstance(r, tuple) else r, x)


def test_rows_are_float32_also_under_autocast():
    """The row softmax runs in float32 even inside bf16 autocast (before, its matmul was cast to bf16: errors of
    ~3e-3 in attention weights)."""
    from value_pl.backbones.capture import RowSoftmax, additive_mask

    g = torch.Generator().manual_seed(1)
    B, N, H, dh = 3, 17, 4, 8
    q = torch.randn(B, N, H * dh, generator=g).bfloat16()
    k = torch.randn(B, N, H * dh, generator=g).bfloat16()
    mask = torch.ones(B, N)
    mask[1, 10:] = 0
    bias = additive_mask(mask, torch.float32)
    rows = torch.tensor([[0, 3, -1], [2, -1, -1], [16, 5, 1]])
    full = torch.softmax(q.float().view(B, N, H, dh).transpose(1, 2) @ k.float().view(B, N, H, dh).permute(0, 2, 3, 1)
                         / dh ** 0.5 + bias[:, None, None, :], -1)
    ref = torch.gather(full, 2, rows.clamp(min=0)[:, None, :, None].expand(-1, H, -1, N)) * (rows >= 0)[:, None, :, None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        soft = RowSoftmax(bias, rows, H)
        got = soft.probs(q, k)
        again = soft.probs(q, k)  # the shared pieces are reused by the next layer
        all_rows = RowSoftmax(bias, None, H).probs(q, k)
    assert got.dtype == torch.float32 and got.shape == (B, H, 3, N)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(got, again)
    torch.testing.assert_close(all_rows, full, atol=1e-6, rtol=1e-5)
    assert bool((got[:, :, :, 10:][1] == 0).all())  # padding keys get no weight
