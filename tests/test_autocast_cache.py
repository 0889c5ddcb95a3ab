"""Frozen Linear weights are cast for autocast once: bit-for-bit plain autocast, fewer operators, float32 outside."""
from __future__ import annotations

import copy
import pickle
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers_backbones import make_batch, row_request, tiny_tokenizer, write_json
from value_pl.backbones import build_backbone
from value_pl.backbones.autocast_cache import AutocastCachedLinear, cache_autocast_weights, uncache_autocast_weights
from value_pl.backbones.capture import CaptureSpec

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[str(func)] += 1
        return func(*args, **(kwargs or {}))


def plain_twin(bb):
    """The same backbone with plain ``nn.Linear`` modules: what autocast does without the cache."""
    twin = copy.deepcopy(bb)
    assert uncache_autocast_weights(twin) > 0
    return twin


@pytest.fixture(scope="module", params=["uniter", "lxmert", "bert"])
def bb(request, tmp_path_factory):
    if request.param == "bert":  # the real pretrained MiniLM (the only real weights here): real magnitudes
        return build_backbone(OmegaConf.create({"family": "bert", "path": "minilm"}))
    d = tmp_path_factory.mktemp("ac")
    tok = tiny_tokenizer(d)
    if request.param == "uniter":
        cfg = {"family": "uniter", "pretrained": False, "tokenizer": tok, "seed": 1,
               "config": write_json(d / "c.json", {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
                                                   "num_attention_heads": 4, "intermediate_size": 64,
                                                   "max_position_embeddings": 64, "type_vocab_size": 2})}
        return build_backbone(OmegaConf.create(cfg), img_dim=16)
    cfg = {"family": "lxmert", "pretrained": False, "tokenizer": tok, "seed": 1,
           "config": write_json(d / "c.json", {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4,
                                               "intermediate_size": 64, "l_layers": 2, "r_layers": 1, "x_layers": 2,
                                               "visual_feat_dim": 16, "visual_pos_dim": 4,
                                               "max_position_embeddings": 64})}
    return build_backbone(OmegaConf.create(cfg))


def run(bb, batch, autocast: bool):
    spec = CaptureSpec(hidden=None, attn=None, rows=row_request(batch))
    with torch.no_grad(), torch.autocast(**BF16, enabled=autocast):
        return bb(batch, spec)


def test_builders_cache_every_linear(bb):
    linears = [m for m in bb.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is AutocastCachedLinear for m in linears)
    # the checkpoint keys and the identity are those of plain Linears
    assert bb.state_dict().keys() == plain_twin(bb).state_dict().keys()
    assert bb.weights_checksum() == bb.identity["checksum"]


def test_bit_for_bit_plain_autocast_with_fewer_operators(bb):
    batch = make_batch(bb, dv=16)
    twin = plain_twin(bb)
    run(bb, batch, True)  # the copies are made on the first call
    with Ops() as cached:
        out = run(bb, batch, True)
    with Ops() as plain:
        ref = run(twin, batch, True)
    assert out.hidden.keys() == ref.hidden.keys() and out.attn.keys() == ref.attn.keys()
    for k in ref.hidden:
        assert out.hidden[k].dtype == ref.hidden[k].dtype
        assert torch.equal(out.hidden[k], ref.hidden[k]), k
    for k in ref.attn:
        assert torch.equal(out.attn[k], ref.attn[k]), k
    calls = cached.n["aten.addmm.default"] + cached.n["aten.mm.default"] + cached.n["aten.bmm.default"]
    assert calls > 0 and calls == plain.n["aten.addmm.default"] + plain.n["aten.mm.default"] + plain.n["aten.bmm.default"]
    linear_calls = cached.n["aten.addmm.default"]  # every Linear here has a bias: one addmm per call
    assert plain.n["aten._to_copy.default"] - cached.n["aten._to_copy.default"] == 2 * linear_calls


def test_float32_outside_autocast_and_no_copies_made(bb):
    fresh = plain_twin(bb)
    cache_autocast_weights(fresh)
    batch = make_batch(bb, dv=16)
    out, ref = run(fresh, batch, False), run(plain_twin(bb), batch, False)
    for k in ref.hidden:
        assert out.hidden[k].dtype == torch.float32 and torch.equal(out.hidden[k], ref.hidden[k]), k
    assert all(m._autocast_copy is None for m in fresh.modules() if isinstance(m, AutocastCachedLinear))


def test_changed_weights_are_recast():
    lin = nn.Linear(8, 4).requires_grad_(False)
    assert cache_autocast_weights(lin) == 1
    x = torch.randn(3, 8)
    with torch.autocast(**BF16):
        before = lin(x)
        lin.load_state_dict({"weight": torch.randn(4, 8), "bias": torch.randn(4)})  # in place: new version
        after = lin(x)
        plain = nn.functional.linear(x, lin.weight, lin.bias)
    assert torch.equal(after, plain) and not torch.equal(before, after)
    with torch.autocast(device_type="cpu", dtype=torch.float16):  # another autocast dtype: its own copy
        assert lin(x).dtype == torch.float16
        assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_moving_the_module_drops_the_copies():
    lin = nn.Linear(8, 4).requires_grad_(False)
    cache_autocast_weights(lin)
    with torch.autocast(**BF16):
        lin(torch.ones(2, 8))
    assert lin._autocast_copy is not None
    lin.to(torch.float64).to(torch.float32)
    assert lin._autocast_copy is None


def test_copies_made_in_inference_mode_serve_input_gradients():
    lin = nn.Linear(8, 4).requires_grad_(False)
    cache_autocast_weights(lin)
    with torch.inference_mode(), torch.autocast(**BF16):
        lin(torch.ones(2, 8))  # e.g. Lightning's validation sanity check runs first
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast(**BF16):
        lin(x).float().sum().backward()
    ref = x.grad.clone()
    x.grad = None
    with torch.autocast(**BF16):
        nn.functional.linear(x, lin.weight, lin.bias).float().sum().backward()
    assert torch.equal(x.grad, ref)


def test_weights_made_in_inference_mode_are_cast_per_call():  # they have no version counter to watch
    with torch.inference_mode():
        lin = nn.Linear(8, 4)
        cache_autocast_weights(lin)
        with torch.autocast(**BF16):
            y = lin(torch.ones(2, 8))
            assert torch.equal(y, nn.functional.linear(torch.ones(2, 8), lin.weight, lin.bias))
    assert lin._autocast_copy is None


def test_trainable_weights_keep_autocast_and_gradients():
    lin = nn.Linear(8, 4)
    cache_autocast_weights(lin)
    with torch.autocast(**BF16):
        lin(torch.randn(3, 8)).float().sum().backward()
    assert lin.weight.grad is not None and lin._autocast_copy is None
    lin.requires_grad_(False)  # frozen for a probe (ProbeCallback), trained again after: the copy does not stay
    with torch.autocast(**BF16):
        lin(torch.randn(3, 8))
    assert lin._autocast_copy is not None
    lin.requires_grad_(True)
    with torch.autocast(**BF16):
        lin(torch.randn(3, 8))
    assert lin._autocast_copy is None


def test_pickles_and_copies():
    lin = nn.Linear(8, 4).requires_grad_(False)
    cache_autocast_weights(lin)
    with torch.autocast(**BF16):
        y = lin(torch.ones(2, 8))
    for other in (pickle.loads(pickle.dumps(lin)), copy.deepcopy(lin)):
        assert type(other) is AutocastCachedLinear
        with torch.autocast(**BF16):
            assert torch.equal(other(torch.ones(2, 8)), y)
