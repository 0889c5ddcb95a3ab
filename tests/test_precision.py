"""bf16 autocast vs fp32: prober inputs and logits within tolerance (CPU autocast here; CUDA when present)."""
import pytest
import torch

from test_capture import demo_batch, tiny_uniter


def _rel(x, y):
    return float((x.float() - y.float()).norm() / y.float().norm().clamp(min=1e-12))


def _compare(tmp_path, device):
    torch.manual_seed(0)
    bb = tiny_uniter(tmp_path, hidden=64, layers=3, heads=4)
    module, batch = demo_batch(tmp_path, bb, "vrc", prober="both", n=16)
    module.to(device)
    from lightning_fabric.utilities.apply_func import move_data_to_device

    batch = move_data_to_device(batch, device)
    with torch.no_grad():
        f32 = module.extract(batch)
        l32 = module.logits(f32)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            f16 = module.extract(batch)
            l16 = module.logits(f16)
    assert f32.keys() == f16.keys() and any(k.startswith("attn:") for k in f32) and any(k.startswith("emb:") for k in f32)
    for k in f32:
        for x, y in zip(f16[k], f32[k]):
            assert x.dtype == torch.float32  # features leave the backbone as fp32
            assert _rel(x, y) < 0.03, (k, _rel(x, y))
        assert _rel(l16[k], l32[k]) < 0.05, (k, _rel(l16[k], l32[k]))
        agree = (l16[k].argmax(-1) == l32[k].argmax(-1)).float().mean()
        assert agree >= 0.9, (k, agree)


def test_bf16_autocast_matches_fp32_cpu(tmp_path):
    _compare(tmp_path, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_matches_fp32_cuda(tmp_path):
    _compare(tmp_path, "cuda")
