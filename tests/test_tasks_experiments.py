"""Every paper-table experiment composes, and so does every point of its multirun sweep."""
import itertools

import pytest
from omegaconf import OmegaConf

from conftest import CONFIGS, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
REQUIRED = {"table3", "table5", "table6", "table8", "table9", "table10", "table11", "fig4", "selectivity", "mdl"}


def sweep_points(exp: str) -> list[list[str]]:
    return [list(p) for p in itertools.product(*sweep_axes(exp))]


def sweep_axes(exp: str) -> list[list[str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    raw = OmegaConf.load(CONFIGS / "experiment" / f"{exp}.yaml")
    params = OmegaConf.select(raw, "hydra.sweeper.params") or {}
    parser = OverridesParser.create()
    axes = []
    for k, v in params.items():
        ov = parser.parse_override(f"{k}={v}")
        vals = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        axes.append([f"{k}={x}" for x in vals])
    return axes


def test_required_experiments_exist():
    assert REQUIRED <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_and_its_sweep_compose(exp):
    axes = sweep_axes(exp)
    assert exp == "demo_vrc" or len(sweep_points(exp)) >= 2
    # every value of every axis once (the others at their first value); seeds do not change the composition
    base = [a[0] for a in axes if not a[0].startswith("seed=")]
    points = [base] + [[v if i == j else b for j, b in enumerate(base)]
                       for i, a in enumerate([a for a in axes if not a[0].startswith("seed=")]) for v in a[1:]]
    for over in points:
        cfg = compose([f"experiment={exp}", *over])
        c = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        if exp != "demo_vrc":
            assert c["data"]["root"] and "???" not in str(c["data"]["root"])
            assert c["backbone"]["family"] in ("uniter", "lxmert", "bert")
        if exp in ("table5", "table11"):
            assert c["task"]["kind"] == "sentence" and c["prober"]["name"] == "senteval_mlp"
            assert c["data"]["root"].endswith("/" + c["task"]["name"])
        if exp in ("table9", "table10", "fig4"):
            assert c["raw_baseline"] is True and c["data"]["root"] in ("shards/vg", "shards/vg_mismatch")


def test_sweep_contents():
    t3 = {tuple(sorted(x for x in p if not x.startswith("seed="))) for p in sweep_points("table3")}
    assert len(t3) == 8 and len(sweep_points("table3")) == 24  # 2 backbones x 2 probers x 2 tasks x 3 seeds
    roots = sorted({x for p in sweep_points("fig4") for x in p if x.startswith("data.root=")})
    assert [compose(["experiment=fig4", r]).data.root for r in roots] == ["shards/vg", "shards/vg_mismatch"]
    t5 = sweep_points("table5")
    assert len(t5) == 3 * 9 * 3


def test_sentence_task_configs():
    for t in ("sentlen", "treedepth", "topconst", "bshift", "tense", "subjnum", "objnum", "somo", "coordinv",
              "wordcontent", "oddmanout"):
        c = compose([f"task={t}", "prober=senteval_lr"])
        assert c.task.name == t and c.task.kind == "sentence"
    assert compose(["task=wordcontent"]).task.force_lr is True
    g = compose(["prober=senteval_mlp"]).prober
    assert list(g.grid.nhid) == [50, 100, 200] and list(g.grid.dropout) == [0.0, 0.1, 0.2]
    assert list(g.grid.l2) == [1e-5, 1e-4, 1e-3, 1e-2] and g.batch_size == 64 and g.tenacity == 5


def test_table6_seeds_are_also_the_twins_initialisation():
    """Table 6's interval covers the random weights too: each seed builds another twin, and no checkpoint is named."""
    for seed in (0, 2):
        c = OmegaConf.to_container(compose(["experiment=table6", "backbone=lxmert_untrained", "task=vrc",
                                            f"seed={seed}", "paths.backbones.lxmert.checkpoint=/x/model_LXRT.pth"]),
                                   resolve=True)
        assert c["backbone"]["pretrained"] is False and c["backbone"]["seed"] == seed
        assert c["backbone"]["checkpoint"] is None


def test_training_budget_does_not_depend_on_the_trainer():
    """A paper table trains its probes for the same number of epochs on CPU, one GPU or DDP (the trainer configs'
    own max_epochs differ: cpu 6, gpu/ddp 10); an explicit trainer.max_epochs on the command line still wins."""
    lightning = [e for e in EXPERIMENTS if e not in ("demo_vrc", "mdl", "table5", "table11")]
    assert {"table3", "table6", "fig4", "table9", "table10", "selectivity"} <= set(lightning)
    for exp in lightning:
        epochs = {t: compose([f"experiment={exp}", f"trainer={t}"]).trainer.max_epochs for t in ("cpu", "gpu", "ddp")}
        assert set(epochs.values()) == {10}, (exp, epochs)
        assert compose([f"experiment={exp}", "trainer=gpu", "trainer.max_epochs=1"]).trainer.max_epochs == 1
