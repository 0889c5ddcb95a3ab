"""Backbone weights are read from a checkpoint without materialising the rest of it: a Lightning checkpoint of a
pretraining run holds Adam's two moments next to the weights (about 3x the weights), which ``compare`` used to read
into memory whole for every checkpoint. Torch files are memory-mapped (``weights_only=True`` kept): only the
encoder's tensors are read, copied out into the model, and the file is let go. Peak memory: benchmarks/ckpt_rss.py."""
import json
import logging
import os
from pathlib import Path

import pytest
import torch

TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2}

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")


def _build(tmp_path: Path, **extra):
    from omegaconf import OmegaConf

    from value_pl.backbones import build_backbone

    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    return build_backbone(OmegaConf.create({"family": "uniter", "config": str(tmp_path / "tiny.json"),
                                            "tokenizer": "minilm", "img_dim": 64, "pretrained": "checkpoint" in extra,
                                            **extra}), img_dim=64)


def lightning_checkpoint(src, path: Path, legacy: bool = False) -> dict:
    """What Lightning saves for a module holding ``src`` as ``self.encoder``, trained with Adam: the weights under
    ``state_dict`` and, per parameter, ``exp_avg`` and ``exp_avg_sq`` under ``optimizer_states``."""
    sd = {f"encoder.{k}": v.clone() for k, v in src.state_dict().items()}
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
             for i, v in enumerate(sd.values()) if v.is_floating_point()}
    ck = {"epoch": 0, "global_step": 10, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
          "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-4, "params": list(state)}]}],
          "lr_schedulers": [], "loops": {}, "callbacks": {}}
    torch.save(ck, path, _use_new_zipfile_serialization=not legacy)
    return ck


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges of ``path`` mapped into this process."""
    out, name = [], str(Path(path).resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == name:
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.append((a, b))
    return out


def inside(t: torch.Tensor, ranges) -> bool:
    p = t.data_ptr()
    return any(a <= p < b for a, b in ranges)


def test_a_lightning_checkpoint_is_mapped_and_only_its_weights_are_copied_out(tmp_path, monkeypatch):
    src = _build(tmp_path, seed=3)
    ck = tmp_path / "epoch=0-step=10.ckpt"
    lightning_checkpoint(src, ck)
    seen = []
    real = torch.load

    def spy(f, *a, **kw):  # keeps what was loaded from the checkpoint, to look at where its tensors live
        out = real(f, *a, **kw)
        if str(f) == str(ck):
            seen.append((kw, out))
        return out

    monkeypatch.setattr(torch, "load", spy)
    bb = _build(tmp_path, checkpoint=str(ck))
    (kw, obj), = seen
    assert kw["weights_only"] is True and kw["mmap"] is True
    ranges = mapped_ranges(ck)
    moments = [t for s in obj["optimizer_states"][0]["state"].values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    # the optimizer moments were never read into memory: they are views of the mapped file
    assert ranges and moments and all(inside(t, ranges) for t in moments)
    # the model holds copies of the encoder's tensors, not views of the file
    want = src.state_dict()
    for k, v in bb.state_dict().items():
        assert not inside(v, ranges), k
        assert torch.equal(v, want[k]), k
    assert bb.describe()["checksum"] == src.describe()["checksum"]

    # nothing keeps the file mapped once the backbone is built
    seen.clear()
    monkeypatch.setattr(torch, "load", real)
    del obj, moments, kw
    bb2 = _build(tmp_path, checkpoint=str(ck))
    import gc

    gc.collect()
    assert mapped_ranges(ck) == [] and bb2.describe()["checksum"] == src.describe()["checksum"]


def test_a_legacy_format_checkpoint_is_read_whole_and_said(tmp_path, caplog):
    """A file in the pre-1.6 (non-zip) format cannot be mapped: it loads as before, read whole, with a warning
    naming it and the way out; ``weights_only`` stays."""
    src = _build(tmp_path, seed=4)
    ck = tmp_path / "old.ckpt"
    lightning_checkpoint(src, ck, legacy=True)
    with caplog.at_level(logging.WARNING, logger="value_pl"):
        bb = _build(tmp_path, checkpoint=str(ck))
    assert bb.describe()["checksum"] == src.describe()["checksum"]
    assert any(str(ck) in r.getMessage() and "legacy (non-zip)" in r.getMessage() for r in caplog.records)
    # a file that needs pickle is still refused, mapped or not
    from value_pl.data.safe_load import UnsafeCheckpointError

    torch.save({"state_dict": {}, "hp": os.PathLike}, tmp_path / "unsafe.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="unsafe.ckpt"):
        _build(tmp_path, checkpoint=str(tmp_path / "unsafe.ckpt"))
