"""CUDA graphs of the frozen forward (value_pl.backbones.graphs), checked on the CPU with the ``Rerun`` engine: the
bucketed, padded forward gives every backbone's real positions what the plain forward gives, the probers' inputs are
unchanged, static buffers are refilled (no stale padding), and what cannot be recorded runs eagerly, counted."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from helpers_backbones import VOCAB, make_batch, row_request, tiny_tokenizer
from test_capture import demo_batch, tiny_uniter
from test_step_sync import SyncWatch
from value_pl.backbones import build_backbone
from value_pl.backbones.base import REGION, TEXT
from value_pl.backbones.capture import CaptureSpec, row_offset
from value_pl.backbones.graphs import GraphedForward, Rerun, bucket

DV = 16
BERT = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2)
CONFIGS = {
    "uniter": BERT,
    "bert": BERT,
    "visualbert": {**BERT, "visual_embedding_dim": DV, "pad_token_id": 0},
    "lxmert": dict(vocab_size=len(VOCAB), hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=3,
                   r_layers=2, x_layers=2, visual_feat_dim=DV, visual_pos_dim=4, max_position_embeddings=64),
}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs")
    tok = tiny_tokenizer(d / "tok")
    out = {}
    for family, cfg in CONFIGS.items():
        p = d / f"{family}.json"
        p.write_text(json.dumps(cfg))
        src = {"pretrained": False, "config": str(p)}
        if family == "bert":  # the text-only backbone reads an HF directory
            from transformers import BertConfig, BertModel

            torch.manual_seed(1)
            BertModel(BertConfig(**cfg)).save_pretrained(str(d / "bert"))
            src = {"path": str(d / "bert")}
        out[family] = build_backbone(OmegaConf.create({"family": family, "tokenizer": tok, "seed": 1, **src}),
                                     img_dim=DV)
    return out


def spans(out, batch) -> dict[str, dict[str, tuple[int, int]]]:
    """Per stream, per modality: (offset, length) of the real batch's positions."""
    n = {TEXT: batch["input_ids"].shape[1], REGION: batch["region_mask"].shape[1]}
    res = {}
    for s, info in out.streams.items():
        res[s] = {m: (info.offset(m), n[m]) for m in (TEXT, REGION)
                  if (info.text_offset if m == TEXT else info.region_offset) is not None}
    return res


def positions(sp: dict[str, tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(o, o + n) for o, n in sp.values()])


def compare(ref, ref_spec, got, got_spec, batch, atol=1e-5, rtol=0.0):
    """Every hidden state and attention row of ``ref`` (plain forward) at the real positions of ``got`` (padded)."""
    assert set(got.hidden) == set(ref.hidden) and set(got.attn) == set(ref.attn)
    se, sg = spans(ref, batch), spans(got, batch)
    for name, h in ref.hidden.items():
        s = name.split(".")[1]
        torch.testing.assert_close(got.hidden[name][:, positions(sg[s])], h[:, positions(se[s])], atol=atol, rtol=rtol)
    for name, a in ref.attn.items():
        qs, ks = ref.attn_streams[name]
        assert got.attn_streams[name] == (qs, ks)
        rows_e, rows_g = [], []
        for m, idx in ref_spec.rows.items():  # rows of each modality sit at their own offset among the captured
            if m not in se[qs]:
                continue
            w = idx.shape[1]
            rows_e.append(torch.arange(w) + row_offset(ref_spec.rows, ref.streams[qs], m))
            rows_g.append(torch.arange(w) + row_offset(got_spec.rows, got.streams[qs], m))
        re_, rg = torch.cat(rows_e), torch.cat(rows_g)
        ke, kg = positions(se[ks]), positions(sg[ks])
        torch.testing.assert_close(got.attn[name][:, :, rg][..., kg], a[:, :, re_][..., ke], atol=atol, rtol=rtol)
    for k in ("text_mask", "special_mask"):  # pass-through fields: the real part, then padding
        t = getattr(ref, k)
        assert torch.equal(getattr(got, k)[:, :t.shape[1]], t) and not getattr(got, k)[:, t.shape[1]:].any()
    assert got.word_to_token is batch["word_to_token"]  # handed on, not recorded


def test_bucket():
    assert [bucket(n, 16) for n in (0, 1, 16, 17, 33)] == [0, 16, 16, 32, 48]
    assert bucket(13, 1) == 13 and bucket(13, 0) == 13


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_padded_forward_equals_the_plain_one(backbones, family):
    bb = backbones[family]
    # every image with a region: a query whose keys are all padding (an image without regions, in LXMERT's vision
    # stream) attends uniformly over however many the batch has, padded or not -- arbitrary in either forward
    n_regions = {"bert": (0, 0, 0), "lxmert": (5, 3, 2)}.get(family, (5, 3, 0))
    batch = make_batch(bb, n_regions=n_regions, dv=DV)
    rows = row_request(batch)
    if family == "bert":
        rows = {TEXT: rows[TEXT]}
    spec = CaptureSpec(hidden=None, attn=None, rows=rows)
    g = GraphedForward(bb, multiples={"text": 8, "regions": 8, "rows": 4}, engine=Rerun())
    with torch.no_grad():
        ref = bb(batch, spec)
        got, got_spec = g(batch, spec)
    assert g.stats()["graphs"] == 1 and g.stats()["eager"] == {}
    assert got.text_mask.shape[1] == bucket(batch["input_ids"].shape[1], 8)
    compare(ref, spec, got, got_spec, batch)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_forward_has_nothing_a_graph_cannot_record(backbones, family):
    """No host read-back and no host-to-device copy of Python data inside any backbone's forward (either would
    fail a CUDA graph's capture): the same watch as the probe step's."""
    bb = backbones[family]
    batch = make_batch(bb, n_regions=(5, 3, 0) if family != "bert" else (0, 0, 0), dv=DV)
    rows = row_request(batch)
    spec = CaptureSpec(hidden=None, attn=None, rows={TEXT: rows[TEXT]} if family == "bert" else rows)
    bb(batch, spec)
    with SyncWatch() as w, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bb(batch, spec)
    assert w.seen == [], w.seen


def test_replays_refill_the_static_buffers(backbones):
    """A second batch of the same bucket replays the recorded forward on refilled buffers: its results are its own,
    a shorter batch's padding is reset (no stale tokens of the longer one), and a third bucket adds a graph."""
    bb = backbones["uniter"]
    g = GraphedForward(bb, multiples={"text": 32, "regions": 8, "rows": 8}, engine=Rerun())
    long = make_batch(bb, n_regions=(5, 3, 0), dv=DV, seed=0)
    short = bb.collator()([{**s, "meta": {**s["meta"], "words": s["meta"]["words"][:3]}}
                           for s in __import__("helpers_backbones").fake_samples((5, 3, 0), DV, seed=1)])
    assert short["input_ids"].shape[1] < long["input_ids"].shape[1]
    with torch.no_grad():
        for batch in (long, short, long):
            spec = CaptureSpec(hidden=None, attn=None, rows=row_request(batch))
            got, got_spec = g(batch, spec)
            compare(bb(batch, spec), spec, got, got_spec, batch)
        first = got.hidden["hidden.joint.1"]
        spec = CaptureSpec(hidden=None, attn=None, rows=row_request(short))
        again, _ = g(short, spec)
        assert again.hidden["hidden.joint.1"] is first  # the same static memory, refilled
    assert g.stats()["graphs"] == 1 and g.stats()["replays"] == 4
    wide = make_batch(bb, n_regions=(12, 3, 0), dv=DV)
    with torch.no_grad():
        g(wide, CaptureSpec(hidden=None, attn=None, rows=row_request(wide)))
    assert g.stats()["graphs"] == 2


def test_verified_replays_read_nothing_back_on_the_host(backbones):
    """Once a graph is verified, a call refills its buffers and replays it without reading a value back on the host
    (the same watch as the probe step's): on a GPU the host goes on issuing the heads while the graph runs."""
    bb = backbones["uniter"]
    g = GraphedForward(bb, multiples={"text": 32, "regions": 8, "rows": 8}, engine=Rerun())
    long = make_batch(bb, n_regions=(5, 3, 0), dv=DV, seed=0)
    short = make_batch(bb, n_regions=(2, 1, 0), dv=DV, seed=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in (long, long, short):  # recorded, verified twice (a padded batch among them)
            g(batch, CaptureSpec(hidden=None, attn=None, rows=row_request(batch)))
        # in a run the rows come with the collated batch
        specs = [CaptureSpec(hidden=None, attn=None, rows=row_request(b)) for b in (short, long)]
        with SyncWatch() as w:
            for batch, spec in zip((short, long), specs):
                g(batch, spec)
    assert g.stats()["replays"] == 5 and g.stats()["graphs"] == 1 and g.stats()["eager"] == {}
    assert w.seen == [], w.seen


def test_what_runs_eagerly_is_counted(backbones):
    bb = backbones["uniter"]
    batch = make_batch(bb, dv=DV)
    spec = CaptureSpec(hidden=["hidden.joint.1"], attn=[])
    g = GraphedForward(bb, max_graphs=1, engine=Rerun())
    with torch.no_grad():
        g(batch, spec)
        g(batch, CaptureSpec(hidden=["hidden.joint.2"], attn=[]))  # another request: another graph, over the cap
    g(batch, spec)  # grad enabled
    assert g.stats()["eager"] == {"over max_graphs": 1, "grad enabled": 1}
    cpu = GraphedForward(bb)  # no engine asked for: graphs only on CUDA
    with torch.no_grad():
        out, s = cpu(batch, spec)
    assert s is spec and cpu.stats()["eager"] == {"not on a CUDA device": 1}
    torch.testing.assert_close(out.hidden["hidden.joint.1"], bb(batch, spec).hidden["hidden.joint.1"])


def test_changed_weights_drop_the_graphs(tmp_path):
    bb = tiny_uniter(tmp_path)
    g = GraphedForward(bb, engine=Rerun())
    module, batch = demo_batch(tmp_path, bb, task="vrc", prober="layer_emb")
    spec = module.plan.capture(batch)
    with torch.no_grad():
        g(batch, spec)
        assert g.stats()["graphs"] == 1
        next(bb.parameters()).add_(1.0)  # in place: the version counter moves
        g(batch, spec)
    assert g.stats()["graphs"] == 1 and g.stats()["replays"] == 2  # recorded again, not replayed stale
    with torch.no_grad():  # a parameter replaced by a new object (load_state_dict(assign=True))
        sd = {k: v.clone() for k, v in bb.state_dict().items()}
        bb.load_state_dict(sd, assign=True)
        for p in bb.parameters():
            p.requires_grad_(False)
        g(batch, spec)
    assert g.stats()["graphs"] == 1 and g.stats()["replays"] == 3 and g._params[0] is next(bb.parameters())


class Stale(Rerun):
    """A recorder whose replays leave the outputs as the recording computed them (a graph reading stale memory)."""

    def capture(self, fn, device=None):
        out, _ = super().capture(fn)
        return out, lambda: None


def test_a_replay_that_differs_from_the_plain_forward_turns_graphs_off(backbones, caplog):
    bb = backbones["uniter"]
    first, second = make_batch(bb, dv=DV, seed=0), make_batch(bb, dv=DV, seed=1)
    spec = CaptureSpec(hidden=["hidden.joint.2"], attn=[])
    g = GraphedForward(bb, engine=Stale())
    with torch.no_grad(), caplog.at_level("WARNING"):
        g(first, spec)  # the recording itself is right
        out, s = g(second, spec)  # its replay is checked too: stale, so refused
        g(second, spec)
    st = g.stats()
    assert st["eager"] == {"verification failed": 1, "disabled": 1} and st["graphs"] == 0
    assert "hidden[hidden.joint.2]: max abs difference" in st["disabled"] and "differs" in caplog.text
    torch.testing.assert_close(out.hidden["hidden.joint.2"], bb(second, spec).hidden["hidden.joint.2"])


def test_one_graph_serves_inference_mode_and_training(backbones):
    """Lightning validates under inference mode: a graph first recorded there is refilled in a training step (its
    buffers and outputs are normal tensors), and the other way round."""
    bb = backbones["uniter"]
    batch = make_batch(bb, dv=DV)
    spec = CaptureSpec(hidden=["hidden.joint.1"], attn=[])
    g = GraphedForward(bb, engine=Rerun())
    with torch.inference_mode():
        g(batch, spec)
    with torch.no_grad():
        out, _ = g(batch, spec)
    with torch.inference_mode():
        g(batch, spec)
    assert g.stats()["graphs"] == 1 and g.stats()["replays"] == 3 and not out.hidden["hidden.joint.1"].is_inference()


def test_the_text_bucket_stays_within_the_position_embeddings(backbones):
    """Padding must not ask for a position the model does not have (a device-side assert on a GPU)."""
    bb = backbones["uniter"]  # 64 positions
    g = GraphedForward(bb, multiples={"text": 48})
    assert g._length("text", 20) == 48 and g._length("text", 50) == 64 and g._length("text", 64) == 64
    assert g._length("regions", 50) == 52  # regions have no position table (multiple 4)


def test_the_autocast_copies_a_graph_reads_stay_alive(backbones):
    """A module's cast weights may be dropped or replaced after the recording (``.to()``, another autocast dtype):
    the graph keeps the copies it read."""
    bb = backbones["uniter"]
    batch = make_batch(bb, dv=DV)
    spec = CaptureSpec(hidden=["hidden.joint.1"], attn=[])
    g = GraphedForward(bb, engine=Rerun())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        g(batch, spec)
    (entry,) = g.graphs.values()
    linears = [m for m in bb.modules() if getattr(m, "_autocast_copy", None) is not None]
    assert linears and len(entry.keep) == len(linears)
    assert all(any(k is m._autocast_copy for k in entry.keep) for m in linears)


def test_a_capture_that_fails_turns_graphs_off(backbones, caplog):
    class Broken:
        def capture(self, fn, device=None):
            raise RuntimeError("operation not permitted when stream is capturing")

    bb = backbones["uniter"]
    batch = make_batch(bb, dv=DV)
    spec = CaptureSpec(hidden=["hidden.joint.1"], attn=[])
    g = GraphedForward(bb, engine=Broken())
    with torch.no_grad(), caplog.at_level("WARNING"):
        out, s = g(batch, spec)
        g(batch, spec)
    assert "could not be recorded" in caplog.text and "not permitted" in g.stats()["disabled"]
    assert g.stats()["eager"] == {"capture failed": 1, "disabled": 1} and s is spec
    torch.testing.assert_close(out.hidden["hidden.joint.1"], bb(batch, spec).hidden["hidden.joint.1"])


@pytest.mark.parametrize("task,prober", [("vrc", "layer_emb"), ("vrc", "attention"), ("vcd", "attention"),
                                         ("vcd", "layer_emb")])
def test_probe_inputs_are_unchanged(tmp_path, task, prober):
    """Through ProbeModule: every head's inputs from the graphed forward equal the plain forward's."""
    bb = tiny_uniter(tmp_path)
    module, batch = demo_batch(tmp_path, bb, task=task, prober=prober)
    ref = module.extract_inputs(batch)
    module.use_cuda_graphs(True, engine=Rerun(), multiples={"text": 64, "regions": 16, "rows": 16})
    for _ in range(2):
        got = module.extract_inputs(batch)
        assert set(got) == set(ref)
        for k in ref:
            for a, b in zip(got[k], ref[k]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert module.graphs.stats()["replays"] == 2 and module.graphs.stats()["eager"] == {}


def test_unknown_multiples_are_refused(backbones):
    with pytest.raises(ValueError, match=r"unknown \['tokens'\]; known: \['regions', 'rows', 'text'\]"):
        GraphedForward(backbones["uniter"], multiples={"tokens": 8})


@pytest.mark.parametrize("task,prober", [("vrc", "attention"), ("vcd", "layer_emb")])
def test_training_with_graphs_gives_the_same_results(tmp_path, demo_root, monkeypatch, task, prober):
    """``cuda_graphs.enabled=true`` through ``python -m value_pl.train``'s driver (Trainer.fit, validation, test),
    with the CPU's stand-in engine: the same accuracies as the plain forward, and results.json counts the graphs."""
    from helpers_backbones import fast_dev_run

    ov = [f"task={task}", f"prober={prober}"]
    plain = fast_dev_run(tmp_path / "plain", demo_root, ov)
    assert "cuda_graphs" not in plain["throughput"]
    on_cpu = fast_dev_run(tmp_path / "cpu", demo_root, ov + ["cuda_graphs.enabled=true"])
    assert set(on_cpu["throughput"]["cuda_graphs"]["eager"]) == {"not on a CUDA device"}
    monkeypatch.setattr(GraphedForward, "_engine_for", lambda self, dev: self.engine or setattr(self, "engine", Rerun())
                        or self.engine)
    graphed = fast_dev_run(tmp_path / "graphed", demo_root, ov + ["cuda_graphs.enabled=true",
                                                                   "cuda_graphs.multiples.text=64"])
    g = graphed["throughput"]["cuda_graphs"]
    assert g["graphs"] >= 1 and g["replays"] >= 3 and g["eager"] == {} and g["disabled"] is None
    acc = lambda r: [(x["name"], x["val_acc"], x["test_acc"]) for x in r["layers"]]  # noqa: E731
    assert len(plain["layers"]) > 1 and acc(graphed) == acc(plain)


def test_sentence_inputs_are_unchanged(tmp_path):
    """A sentence task's heads (mean over the words of every layer) read the padded output's masks."""
    from value_pl.probers.module import ProbeModule

    bb = tiny_uniter(tmp_path)
    _, batch = demo_batch(tmp_path, bb)
    module = ProbeModule(bb, task={"name": "sentlen", "kind": "sentence", "labels": ["0", "1"]},
                         prober={"name": "senteval_lr"})
    ref = module.extract_inputs(batch)["sent"][0]
    module.use_cuda_graphs(True, engine=Rerun())
    got = module.extract_inputs(batch)["sent"][0]
    assert module.graphs.stats()["graphs"] == 1 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["uniter", "lxmert"])
def test_cuda_graphs_replay_alternating_shapes(backbones, family):
    """On a GPU: two graphs replayed A B A B on fresh batches, under bf16 autocast, in training's no_grad and in
    validation's inference mode, every call checked against the plain forward on the same inputs (``verify``) and
    every real position against the plain forward on the unpadded batch."""
    import copy

    bb = copy.deepcopy(backbones[family]).cuda()
    g = GraphedForward(bb, verify=1000)
    shapes = [(5, 3, 2), (12, 7, 9)]
    calls = 0
    for rnd in range(3):
        for mode in (torch.no_grad, torch.inference_mode):
            for n_regions in shapes:
                batch = _to(make_batch(bb, n_regions=n_regions, dv=DV, seed=10 * rnd + len(n_regions)), "cuda")
                spec = CaptureSpec(hidden=None, attn=None, rows={k: v.cuda() for k, v in row_request(batch).items()})
                with mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    got, got_spec = g(batch, spec)
                    calls += 1
                    ref = bb(batch, spec)
                    compare(ref, spec, got, got_spec, batch, atol=3e-2, rtol=3e-2)
    st = g.stats()
    assert st["disabled"] is None and st["eager"] == {} and st["graphs"] == 2 and st["replays"] == calls, st


class _Module:
    """What ``use_cuda_graphs`` reads of a ProbeModule: ``graphs`` and ``use_cuda_graphs(...)``."""

    def __init__(self):
        self.graphs, self.calls = None, []

    def use_cuda_graphs(self, enabled=True, **options):
        self.calls.append(options)
        self.graphs = object() if enabled else None


class _Trainer:
    def __init__(self, device: str, world_size: int = 1):
        self.strategy = type("S", (), {"root_device": torch.device(device)})()
        self.world_size = world_size


@pytest.mark.parametrize("enabled,device,world,cache,attached", [
    (None, "cuda", 1, False, True),    # the default on one GPU: on
    (None, "cpu", 1, False, False),    # the default on the CPU: off (nothing to replay)
    (None, "cuda", 2, False, False),   # DDP: not measured on several GPUs yet, so only an explicit true
    (True, "cuda", 2, False, True),
    (None, "cuda", 1, True, False),    # a feature cache has no backbone forward
    (None, None, 1, False, False),     # no trainer (extract): only an explicit true turns them on
    (False, "cuda", 1, False, False),  # forced off
    (True, "cpu", 1, False, True),     # forced on: attached, every CPU call then runs eagerly and is counted
])
def test_graphs_are_on_by_default_on_a_gpu(enabled, device, world, cache, attached):
    """``cuda_graphs.enabled=null`` (configs/train.yaml) turns the graphs on when the Trainer runs the model on one
    CUDA device: measured on an H200, they cut the host's issue time of a step by 1.8-4.7 ms and raised end-to-end
    samples/s (docs/performance.md). The composed config's default is null and passes the start-up checks."""
    from hydra import compose, initialize_config_dir

    from value_pl import CONFIG_DIR
    from value_pl.driver.setup import use_cuda_graphs
    from value_pl.driver.validate import check_run

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=gpu"])
    assert cfg.cuda_graphs.enabled is None
    check_run(cfg, "train")
    cfg.cuda_graphs.enabled = enabled
    module, dm = _Module(), type("DM", (), {"manifest": {"cache": {"heads": []}} if cache else {}})()
    trainer = _Trainer(device, world) if device else None
    assert use_cuda_graphs(cfg, module, dm, trainer) is attached
    assert (module.graphs is not None) is attached
    if attached:
        assert module.calls == [{"max_graphs": 8, "verify": 2, "multiples": {"text": 8, "regions": 4, "rows": 4}}]
        assert use_cuda_graphs(cfg, module, dm, trainer) and len(module.calls) == 1  # attached once
