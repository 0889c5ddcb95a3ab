"""The config surface: every group combination composes and passes (or is refused by) the start-up checks of
:mod:`value_pl.driver.validate`; misspelt keys stop every entry point; out-of-range values are refused naming the
key. Compose only (no weights, no data) except the few end-to-end refusals at the bottom."""
from __future__ import annotations

import functools
import itertools
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO
from omegaconf import OmegaConf, open_dict

from value_pl.data.options import OptionError
from value_pl.data.schema import pair_kind
from value_pl.driver.validate import check_analyze, check_compare, check_run


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_compose():
    """One Hydra initialisation for the module; compose(config_name, overrides) under it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        yield lambda name="train", overrides=(): compose(config_name=name, overrides=list(overrides))


@functools.cache
def option(group: str, name: str):
    """A group option as Hydra places it (``_group_`` package: the file's keys under ``group``)."""
    cfg = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    assert "defaults" not in cfg, f"{group}/{name}.yaml has a defaults list: compose it instead"
    return OmegaConf.to_container(cfg)  # cached: a fresh node is made where it is placed


def with_groups(base, **groups):
    """``base`` with whole group nodes replaced, as ``group=option`` on the command line replaces them."""
    cfg = base.copy()
    with open_dict(cfg):
        for g, name in groups.items():
            cfg[g] = option(g, name)
    OmegaConf.set_struct(cfg, True)
    return cfg


def refusal(task: str, prober: str, backbone_family: str) -> str | None:
    """What the grid must refuse, written out independently of the validator: the option it names."""
    kind = pair_kind(task)
    if kind == "sentence" and prober == "attention":
        return "prober=attention"
    if kind != "sentence" and prober.startswith("senteval"):
        return f"prober={prober}"
    if kind != "sentence" and backbone_family == "bert":
        return "backbone.family=bert"
    return None


@pytest.mark.parametrize("backbone", names("backbone"))
def test_group_grid_composes_and_is_checked(backbone, hydra_compose):
    """task x prober for this backbone, with trainer x data x logger cycled over the grid: every combination
    composes (struct, resolvable apart from the paths a user must give), and exactly the meaningless ones are
    refused, with a message naming the options."""
    base = hydra_compose("train", [f"backbone={backbone}"])
    assert OmegaConf.is_struct(base)
    family = base.backbone.family
    others = list(itertools.product(names("trainer"), names("data"), names("logger")))
    grid = list(itertools.product(names("prober"), names("task")))
    for i, (prober, task) in enumerate(grid):
        trainer, data, logger = others[i % len(others)]
        cfg = with_groups(base, prober=prober, task=task, trainer=trainer, data=data, logger=logger)
        want = refusal(task, prober, family)
        if want is None:
            check_run(cfg)
            continue
        with pytest.raises(OptionError) as e:
            check_run(cfg)
        assert want in str(e.value) and f"task={task}" in str(e.value), (backbone, prober, task, e.value)
    # the substitution above is what Hydra composes
    real = hydra_compose("train", [f"backbone={backbone}", "prober=attention", "task=vcd", "trainer=gpu",
                                   "data=shards", "logger=csv"])
    assert real == with_groups(base, prober="attention", task="vcd", trainer="gpu", data="shards", logger="csv")


def test_every_trainer_data_logger_passes(hydra_compose):
    base = hydra_compose("train")
    for trainer, data, logger in itertools.product(names("trainer"), names("data"), names("logger")):
        check_run(with_groups(base, trainer=trainer, data=data, logger=logger))


def _sweep(own) -> list[dict]:
    """The experiment's sweep over config groups (backbone/prober/task), as the basic sweeper expands it."""
    params = OmegaConf.select(own, "hydra.sweeper.params", default=None) or {}
    groups = {k: str(v).split(",") for k, v in params.items() if k in ("backbone", "prober", "task")}
    return [dict(zip(groups, vals)) for vals in itertools.product(*groups.values())] or [{}]


@pytest.mark.parametrize("exp", names("experiment"))
def test_experiment_sweeps_pass_the_checks(exp, hydra_compose):
    """Every job of every experiment's sweep passes check_run: the experiment composed once by Hydra, then each
    job's groups replaced and the experiment's own keys merged again on top (Hydra's order)."""
    raw = OmegaConf.load(CONFIGS / "experiment" / f"{exp}.yaml")
    own = OmegaConf.masked_copy(raw, [k for k in raw if k not in ("defaults", "hydra")])
    base = hydra_compose("train", [f"experiment={exp}"])
    for job in _sweep(raw):
        cfg = OmegaConf.merge(with_groups(base, **job), own)
        check_run(cfg)
    if exp == "table5":  # the emulation is what Hydra composes for one job
        job = ["backbone=bert", "task=tense"]
        assert hydra_compose("train", [f"experiment={exp}", *job]) == \
            OmegaConf.merge(with_groups(base, backbone="bert", task="tense"), own)


@pytest.mark.parametrize("exp", [e for e in names("experiment") if e not in ("demo_vrc",)])
def test_experiments_read_each_tasks_own_shard_set(exp, hydra_compose):
    """An experiment's ``data.root`` is its task's shard set (``task.data_root``) for every task it may be given, not
    only those of its own sweep: ``experiment=mdl task=sentlen`` reads ``<paths.senteval>/sentlen`` (it once read
    ``paths.senteval`` itself), a pair task its ``paths.*`` set; experiments that sweep ``data.root`` themselves
    (table9/10, fig4: matched and mismatched captions) keep their own."""
    paths = ["paths.vg=/d/vg", "paths.flickr30k=/d/f30k", "paths.senteval=/d/senteval"]
    own = {"vri": "/d/vg", "vrc": "/d/vg", "vcd": "/d/f30k", "vcc": "/d/f30k", "sentlen": "/d/senteval/sentlen",
           "tense": "/d/senteval/tense"}
    for task, want in own.items():
        cfg = hydra_compose("train", [f"experiment={exp}", f"task={task}", *paths])
        assert cfg.task.data_root == want
        raw = OmegaConf.load(CONFIGS / "experiment" / f"{exp}.yaml")
        if "data.root" not in (OmegaConf.select(raw, "hydra.sweeper.params", default=None) or {}):
            assert cfg.data.root == want, (exp, task, cfg.data.root)


def test_analyze_grid_and_paper_sweep(hydra_compose):
    base = hydra_compose("analyze")
    assert OmegaConf.is_struct(base)
    for analysis, backbone, data in itertools.product(names("analysis"), names("backbone"), names("data")):
        check_analyze(with_groups(base, analysis=analysis, backbone=backbone, data=data))
    paper = hydra_compose("analyze", ["analyze_experiment=paper"])
    check_analyze(paper)
    for backbone in ("uniter", "lxmert", "uniter_untrained", "lxmert_untrained"):
        check_analyze(hydra_compose("analyze", ["analyze_experiment=paper", f"backbone={backbone}"]))


def test_compare_suites_and_builds_pass(hydra_compose):
    from value_pl.compare.suite import suite_config
    from value_pl.datasets.build import check_build

    base = hydra_compose("compare", ["checkpoints=x"])
    for suite, backbone in itertools.product(names("suite"), names("backbone")):
        cfg = with_groups(base, suite=suite, backbone=backbone)
        if cfg.backbone.family == "bert":  # the suites probe pair tasks: refused on a text-only backbone
            with pytest.raises(OptionError, match="text-only"):
                check_compare(cfg)
            with open_dict(cfg):
                cfg.suite.tasks = ["bshift"]
        check_compare(cfg)
        assert suite_config(cfg.suite)["name"] == suite
    for d in names("dataset"):
        check_build(hydra_compose("build", [f"dataset={d}"]))
    check_run(hydra_compose("eval", ["ckpt_path=x"]), "eval")
    with pytest.raises(OptionError, match="mdl=true"):
        check_run(hydra_compose("eval", ["ckpt_path=x", "mdl=true"]), "eval")
    check_run(hydra_compose("extract", ["cache.root=x"]), "extract")


@pytest.mark.parametrize("name,typo", [("train", "prober.lrr=1e-3"), ("eval", "data.batch_sise=8"),
                                       ("extract", "cache.dtyp=float32"), ("analyze", "kmeans.n_inits=3"),
                                       ("compare", "suite.epoch=2"), ("build", "dataset.iou=0.4"),
                                       ("train", "optim.learning_rate=0.1"), ("analyze", "max_sample=3")])
def test_a_misspelt_key_stops_every_entry_point(name, typo, hydra_compose):
    from hydra.errors import ConfigCompositionException

    assert OmegaConf.is_struct(hydra_compose(name))
    with pytest.raises(ConfigCompositionException, match="Could not override"):
        hydra_compose(name, [typo])


BAD_RUN = [
    ("optim.lr=0", "optim.lr=0"), ("optim.weight_decay=-1", "optim.weight_decay"),
    ("data.batch_size=0", "data.batch_size"), ("data.num_workers=-1", "data.num_workers"),
    ("data.prefetch_factor=0", "data.prefetch_factor"), ("data.train_batches=0", "data.train_batches"),
    ("data.eval_batch_size=0", "data.eval_batch_size"), ("data.shuffle_buffer=-5", "data.shuffle_buffer"),
    ("layers=6", "layers=6"), ("layers=[-1]", "layers"), ("prober.rank=0", "prober.rank"),
    ("mdl_opts.fractions=[0.1,1,100]", "mdl_opts.fractions"), ("mdl_opts.max_epochs=0", "mdl_opts.max_epochs"),
    ("mdl_opts.max_train=0", "mdl_opts.max_train"), ("mdl_opts.lr=-0.1", "mdl_opts.lr"),
    ("cuda_graphs.multiples.text=0", "cuda_graphs.multiples.text"), ("cuda_graphs.max_graphs=0", "max_graphs"),
    ("backbone.max_regions=0", "backbone.max_regions"), ("backbone.max_text_len=1", "backbone.max_text_len"),
    ("backbone.box_mode=xyxy5", "backbone.box_mode"), ("backbone.family=clip", "backbone.family"),
    ("control=yes", "control"), ("logger.name=tensorboard", "logger.name"), ("logger.mode=on", "logger.mode"),
    ("task.kind=sentence", "task.kind=sentence contradicts task=vrc"), ("control_seed=-1", "control_seed"),
    ("data.splits=train", "data.splits"), ("mdl=true ckpt_path=/x/last.ckpt", "ckpt_path"),
    ("geometry_baseline=yes", "geometry_baseline"), ("data.register_buffers=maybe", "data.register_buffers"),
    ("data.register_buffers=null", "data.register_buffers"), ("data.register_buffers=2", "data.register_buffers"),
    ("data.pin_threads=0", "data.pin_threads"), ("data.pin_threads=9", "data.pin_threads"),
    ("data.pin_threads=1.5", "data.pin_threads"),
    ("data.copy_stream=maybe", "data.copy_stream"), ("data.copy_stream=null", "data.copy_stream"),
    ("data.pack_batches=maybe", "data.pack_batches"), ("data.pack_batches=null", "data.pack_batches"),
    ("data.read_ahead=maybe", "data.read_ahead"), ("data.read_ahead=2", "data.read_ahead"),
    ("data.map_shards=maybe", "data.map_shards"), ("data.map_shards=null", "data.map_shards"),
]
BAD_SENTEVAL = [("prober.dropout=1.0", "prober.dropout"), ("prober.grid.nhid=[50,-1]", "prober.grid.nhid"),
                ("prober.grid.l2=[]", "prober.grid.l2"), ("prober.lr=0", "prober.lr"),
                ("prober.batch_size=0", "prober.batch_size"), ("prober.max_epoch=0", "prober.max_epoch"),
                ("prober.tenacity=-1", "prober.tenacity"), ("prober.epoch_size=0", "prober.epoch_size")]


@pytest.mark.parametrize("override,named", BAD_RUN + BAD_SENTEVAL)
def test_out_of_range_values_are_refused_naming_the_key(override, named, hydra_compose):
    extra = ["task=sentlen", "prober=senteval_mlp"] if (override, named) in BAD_SENTEVAL else []
    cfg = hydra_compose("train", [*extra, *override.split()])
    with pytest.raises(OptionError, match=named.replace("[", r"\[")):
        check_run(cfg)


@pytest.mark.parametrize("override,named", [
    ("max_samples=0", "max_samples"), ("batch_size=0", "batch_size"), ("num_workers=-2", "num_workers"),
    ("tsne_sample=-1", "tsne_sample"), ("tsne_layers=[1,-2]", "tsne_layers"), ("rand_iou=0", "rand_iou"),
    ("rand_iou=1.5", "rand_iou"), ("kmeans.n_init=0", "kmeans.n_init"), ("kmeans.max_iter=0", "kmeans.max_iter"),
    ("i2t.threshold=1.5", "i2t.threshold"), ("maxattn.average=heads", "maxattn.average"), ("analysis.run=[]", "analysis.run"),
    ("analysis.run=[fusion,fussion]", "fussion"), ("data.cache=/x", "data.cache")])
def test_analyze_values_are_refused(override, named, hydra_compose):
    with pytest.raises(OptionError, match=named.replace("[", r"\[")):
        check_analyze(hydra_compose("analyze", [override]))


@pytest.mark.parametrize("override,named", [
    ("suite.lr=0", "suite.lr"), ("suite.epochs=0", "suite.epochs"), ("suite.rank=0", "suite.rank"),
    ("suite.analyses=[fusion,nmi]", "suite.analyses"), ("suite.prober=senteval_mlp", "suite.prober"),
    ("suite.analysis_samples=0", "suite.analysis_samples"), ("suite.cpu_threads=0", "suite.cpu_threads"),
    ("suite.kmeans.n_init=0", "suite.kmeans"), ("checkpoint_key=weights", "checkpoint_key"),
    ("steps=[100,-1]", "steps")])
def test_compare_values_are_refused(override, named, hydra_compose):
    from value_pl.compare.suite import suite_config

    cfg = hydra_compose("compare", ["checkpoints=x", override])
    with pytest.raises(OptionError, match=named):
        check_compare(cfg)
        suite_config(cfg.suite)


def test_suite_dict_refuses_a_misspelt_option():
    """ProbeCallback(suite={...}) and suite_config take plain dicts: a typo is an error, not a silent default."""
    from value_pl.compare.suite import suite_config

    with pytest.raises(OptionError, match="unknown option.*epoch\\b"):
        suite_config({"epoch": 2})
    assert suite_config({"epochs": 2})["epochs"] == 2


@pytest.mark.parametrize("override,named", [
    ("feature_dim=0", "feature_dim"), ("maxcount=0", "maxcount"), ("dataset.iou_threshold=0", "iou_threshold"),
    ("dataset.supplied_iou=1.2", "supplied_iou"), ("dataset.max_regions=0", "max_regions"),
    ("dataset.top_k=0", "top_k"), ("dataset.uniter.min_bb=200", "min_bb"), ("dataset.variant=mismatched", "variant"),
    ("dataset.splits.val=-0.1", "dataset.splits"), ("dataset.features_format=tsv", "features_format"),
    ("dataset.vcd_negatives=random", "vcd_negatives")])
def test_build_values_are_refused(override, named, hydra_compose):
    from value_pl.datasets.build import check_build

    dataset = "dataset=flickr30k" if "vcd_negatives" in override else "dataset=vg"
    cfg = hydra_compose("build", [dataset, override] if override.startswith("dataset.") else [override])
    with pytest.raises(OptionError, match=named):
        check_build(cfg)


# ------------------------------------------------------------------------------ end to end (refused at setup)
@pytest.mark.parametrize("overrides,named", [
    (["task=sentlen", "prober=attention"], "prober=attention"),
    (["task=vcd", "prober=senteval_lr"], "prober=senteval_lr"),
    (["task=vrc", "backbone=bert_minilm"], "backbone.family=bert"),
    (["task=vcc", "raw_baseline=true"], "raw_baseline=true"),
    (["task=sentlen", "prober=senteval_lr", "geometry_baseline=true"], "geometry_baseline=true"),
    (["task=sentlen", "prober=layer_emb", "layers=[1,boxes]"], "boxes control row"),
])
def test_meaningless_runs_stop_before_loading_anything(overrides, named, hydra_compose, tmp_path, monkeypatch):
    """train() refuses at its first line: no backbone is built, no shard is read, no run dir is made."""
    import value_pl.driver.train as driver
    from value_pl.driver.train import train

    def no(*a, **k):
        raise AssertionError("reached setup")

    for name in ("prepare", "make_datamodule", "train_mdl", "train_senteval"):
        monkeypatch.setattr(driver, name, no)
    cfg = hydra_compose("train", [*overrides, f"data.root={tmp_path / 'none'}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(OptionError, match=named.replace("[", r"\[")):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_cli_refusal_is_one_line_and_exit_2(tmp_path):
    """The command line: one ``[value-pl] config: ...`` line naming the options, exit status 2, no stack trace."""
    p = subprocess.run([sys.executable, "-m", "value_pl.train", "task=sentlen", "prober=attention", "logger=none",
                        f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "[value-pl] config: prober=attention" in p.stderr and "task=sentlen" in p.stderr
    assert "Traceback" not in p.stderr


def test_eval_takes_the_checkpoints_backbone_whole_and_checks_it(tmp_path, hydra_compose):
    """eval replaces backbone and prober by the checkpoint's (another backbone group on its command line no longer
    fails on the other family's keys), then checks the combination it will run."""
    import torch

    from value_pl.driver.train import evaluate

    uniter = dict(option("backbone", "minilm_uniter"), img_dim=64)
    ck = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {
        "backbone_cfg": uniter, "prober": {"name": "attention", "bias": False}, "seed": 3,
        "task": {"name": "sentlen", "kind": "sentence", "labels": ["a", "b"]}}}, ck)
    cfg = hydra_compose("eval", [f"ckpt_path={ck}", "backbone=bert_minilm", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(OptionError, match="prober=attention.*task=sentlen"):
        evaluate(cfg)


@pytest.mark.parametrize("name", ["train", "analyze"])
def test_the_sweep_report_switch_is_a_config_key(name, hydra_compose):
    """``hydra.callbacks.sweep_report.enabled=false`` (no ``+``) reaches SweepReport."""
    from hydra import compose
    from hydra.utils import instantiate

    c = compose(config_name=name, overrides=["hydra.callbacks.sweep_report.enabled=false"], return_hydra_config=True)
    assert instantiate(c.hydra.callbacks.sweep_report).enabled is False


def test_an_unset_checkpoint_prefix_keeps_compare_cache_keys(hydra_compose):
    """backbone.checkpoint_prefix is now a config key (null): compare's cache rows keyed before it existed still hit."""
    from types import SimpleNamespace

    from value_pl.compare.driver import cache_identity

    cfg = hydra_compose("compare", ["checkpoints=x"])
    assert cfg.backbone.checkpoint_prefix is None
    ck, suite, data = SimpleNamespace(path="/nonexistent/a.pt", is_dir=False), {"name": "quick"}, {"root": "r"}
    old = cfg.copy()
    with open_dict(old):
        del old.backbone["checkpoint_prefix"]
    assert cache_identity(cfg, suite, data, ck) == cache_identity(old, suite, data, ck)
    with open_dict(cfg):
        cfg.backbone.checkpoint_prefix = "ema"
    assert cache_identity(cfg, suite, data, ck) != cache_identity(old, suite, data, ck)


def test_eq4_options_on_a_sentence_task_are_said_to_be_ignored(hydra_compose):
    """``task=<sentence> prober=layer_emb`` trains one classifier per layer: ``prober.rank``/``prober.bias`` (Eq. 4)
    are not read there, and the run names them instead of ignoring them silently; pair tasks read them."""
    from value_pl.driver.setup import prober_options_ignored

    sent = hydra_compose("train", ["task=sentlen", "prober=layer_emb"])
    assert prober_options_ignored(sent, "sentence") == []  # the defaults: rank null, bias false
    sent.prober.rank, sent.prober.bias = 64, True
    assert prober_options_ignored(sent, "sentence") == ["prober.rank=64", "prober.bias=True"]
    pair = hydra_compose("train", ["task=vrc", "prober=layer_emb", "prober.rank=64", "prober.bias=true"])
    assert prober_options_ignored(pair, "region_region") == []
