"""What the README, docs/ and shards/README.md tell a user to run and name, checked without training: every
``python -m value_pl.<cmd> key=value`` composes with Hydra as the command would; every inline ``key=value`` is a
config key and every ``group=option`` a config file; the ``--flags`` of the argparse commands, benchmarks/ and
examples/ exist; the tests, ``value_pl`` names and backbone config fields the pages cite exist; and the README's
example output is what a run prints for its numbers."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "shards" / "README.md"]

HYDRA = {"value_pl.train": "train", "value_pl.eval": "eval", "value_pl.extract": "extract",
         "value_pl.analyze": "analyze", "value_pl.compare": "compare", "value_pl.datasets.build": "build"}
ARGPARSE = {"value_pl.report": "value_pl.report.__main__", "value_pl.datasets.demo": "value_pl.datasets.demo"}


def _snippets(text: str) -> list[str]:
    """Code: each line of a fenced block (backslash continuations joined, `` # `` comments cut) and each inline
    code span (newlines inside it read as spaces)."""
    out = []
    for m in re.finditer(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL):
        body = re.sub(r"\\\n\s*", " ", m[1])
        out += [line.split(" # ")[0] for line in body.splitlines()]
    rest = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    out += [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", rest)]
    return out


def _shell_vars() -> dict[str, str]:
    """``P="..."`` of docs/reproducing.md: the data and checkpoint paths every experiment command takes as ``$P``."""
    text = (REPO / "docs" / "reproducing.md").read_text()
    m = re.search(r'^P="(.*?)"$', re.sub(r"\\\n\s*", " ", text), flags=re.MULTILINE)
    assert m, "docs/reproducing.md: no P=\"...\" block"
    return {"P": m[1]}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, module, arguments) of every ``python -m value_pl.<cmd>`` (also after torchrun/srun) with arguments."""
    env = _shell_vars()
    out = []
    for p in PAGES:
        for s in _snippets(p.read_text()):
            for m in re.finditer(r"-m (value_pl(?:\.\w+)+)((?:\s+(?!&&|\||#|->)\S+)*)", s):
                args = re.sub(r"\$(\w+)", lambda v: env.get(v[1], v[0]), m[2])
                args = re.sub(r"<[^>]*>", "@", args)  # placeholders: <sentence task>, <time>
                try:
                    toks = shlex.split(args)
                except ValueError as e:
                    raise AssertionError(f"{p.name}: cannot split `{m[0]}`: {e}") from e
                toks = [t for t in toks if t != "-m" and not re.search(r"(^|=)(@|\.\.\.)$", t)]
                if m[1] in HYDRA:  # prose after a command in a listing ("dataset=<name>: the build CLI") ends it
                    toks = toks[:next((i for i, t in enumerate(toks) if "=" not in t or t.endswith(":")), None)]
                if toks:
                    out.append((p.name, m[1], toks))
    return out


def _split_sweep(value: str) -> list[str]:
    """``a,b`` -> [a, b] (a multirun sweep); commas inside brackets or quotes are one value."""
    if value.startswith(("[", "'", '"')) or "," not in value:
        return [value]
    return value.split(",")


def _compose(config: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from value_pl import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name=config, overrides=overrides, return_hydra_config=True)


def _variants(toks: list[str]) -> list[list[str]]:
    """One override list per value of each swept key (not their product: each value composes on its own)."""
    base, sweeps = [], []
    for t in toks:
        k, _, v = t.partition("=")
        vals = _split_sweep(v) if "=" in t else [v]
        (sweeps.append((k, vals)) if len(vals) > 1 else base.append(t))
    out = [[*base, *(f"{k}={vals[0]}" for k, vals in sweeps)]]
    for i, (k, vals) in enumerate(sweeps):
        for v in vals[1:]:
            out.append([*base, *(f"{kk}={vv[0]}" for kk, vv in sweeps[:i]), f"{k}={v}",
                        *(f"{kk}={vv[0]}" for kk, vv in sweeps[i + 1:])])
    return out


def test_the_pages_run_every_command():
    mods = {m for _, m, _ in documented_commands()}
    assert {"value_pl.train", "value_pl.eval", "value_pl.extract", "value_pl.analyze", "value_pl.compare",
            "value_pl.datasets.build", "value_pl.report", "value_pl.datasets.demo"} <= mods


def test_every_documented_hydra_command_composes():
    """Each override names a config key or group option that exists: a typo'd key (``data.workers=4``), a removed
    option or a group option that is not a file fails here as it would on the command line."""
    from hydra import compose, initialize_config_dir

    from value_pl import CONFIG_DIR

    bad, seen = [], set()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        for page, mod, toks in documented_commands():
            if mod not in HYDRA:
                continue
            for overrides in _variants(toks):
                if (mod, tuple(overrides)) in seen:
                    continue
                seen.add((mod, tuple(overrides)))
                try:
                    compose(config_name=HYDRA[mod], overrides=overrides, return_hydra_config=True)
                except Exception as e:  # noqa: BLE001 -- collected, reported together
                    msg = str(e).splitlines()[0]
                    bad.append(f"{page}: python -m {mod} {' '.join(overrides)}\n    {type(e).__name__}: {msg}")
    assert not bad, "\n".join(bad)


def _flags(module: str) -> set[str]:
    import importlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    return set(re.findall(r"(--[\w-]+)", buf.getvalue()))


def test_every_documented_flag_exists():
    flags = {mod: _flags(m) for mod, m in ARGPARSE.items()}
    bad = [f"{page}: python -m {mod} {t}" for page, mod, toks in documented_commands() if mod in ARGPARSE
           for t in toks if t.startswith("--") and t.split("=")[0] not in flags[mod]]
    assert not bad, "\n".join(bad)


# Names written as ``name=value`` in the pages that are not config keys, each with what it is.
NOT_CONFIG = {
    "all_ranks": "ProbeCallback argument", "at_start": "ProbeCallback argument",
    "every_n_steps": "ProbeCallback argument", "on_error": "ProbeCallback argument",
    "save_last": "Lightning ModelCheckpoint argument", "weights_only": "torch.load argument",
    "local_files_only": "transformers from_pretrained argument", "output_attentions": "transformers argument",
    "capture_error_mode": "torch.cuda.graph argument", "padding_idx": "nn.Embedding argument",
    "version_base": "Hydra main argument", "job_type": "wandb.init argument", "step": "wandb.log argument",
    "epoch": "a name in a checkpoint file pattern", "k": "k-means' k",
    "img_dim": "the backbone's field, quoted in an error message", "mmap": "torch.load argument",
    "layer_norm_eps": "a transformers model config field, quoted in an error message",
}


def _walk(d, prefix: str, keys: set[str]) -> None:
    for k, v in (d or {}).items():
        if isinstance(k, str) and k not in ("defaults", "hydra"):
            keys.add(prefix + k)
            if isinstance(v, dict):
                _walk(v, f"{prefix}{k}.", keys)


def config_keys() -> set[str]:
    """Every key of every command's default config, every config group's name, and every key of every option
    of every group (``prober.rank`` is only in ``prober=layer_emb``)."""
    import yaml
    from omegaconf import OmegaConf

    from value_pl import CONFIG_DIR

    keys: set[str] = set()
    for config in set(HYDRA.values()):
        cfg = _compose(config, ["checkpoints=x"] if config == "compare" else [])
        cfg = OmegaConf.to_container(cfg, resolve=False)
        cfg.pop("hydra", None)
        _walk(cfg, "", keys)
    for group in Path(CONFIG_DIR).iterdir():
        if group.is_dir():
            keys.add(group.name)
            for f in group.glob("*.yaml"):
                _walk(yaml.safe_load(f.read_text()), "" if group.name.endswith("experiment") else f"{group.name}.",
                      keys)
    return keys


def test_every_documented_override_names_a_config_key():
    """``key=value`` anywhere in the pages' code (`` `kmeans.n_init=10` `` in the text, an option in a listing's
    comment) names a key that one of the commands' configs has (``hydra.*`` keys are Hydra's own)."""
    keys = config_keys()
    bad = []
    for p in PAGES:
        for s in _snippets(p.read_text()):
            for m in re.finditer(r"(?:^|[\s'\"])\+?([a-z_][\w.]*)=(?!=)", s):
                k = m[1]
                if k in keys or k in NOT_CONFIG or k.startswith("hydra.") or m[0].lstrip(" '\"").startswith("+"):
                    continue
                bad.append(f"{p.name}: {k}= in `{s.strip()[:100]}`")
    assert not bad, "\n".join(bad) + "\n(not a config key? name it in NOT_CONFIG with what it is)"


def test_every_documented_script_flag_exists():
    """``python benchmarks/<x>.py --flag`` and ``python examples/<x>.py --flag`` (``bash benchmarks/gpu.sh`` passes its
    arguments to ``benchmarks/gpu.py``, and so does ``benchmarks/device.sh`` through it): the script exists and defines
    each flag."""
    bad, n = [], 0
    for p in PAGES:
        for s in _snippets(p.read_text()):
            for m in re.finditer(r"(?:python|bash) ((?:benchmarks|examples)/[\w/]+\.(?:py|sh))((?:\s+[^\s#|]+)*)", s):
                script = REPO / m[1]
                if not script.exists():
                    bad.append(f"{p.name}: no {m[1]}")
                    continue
                src = (script.with_suffix(".py") if script.suffix == ".sh" else script).read_text() \
                    if script.name != "device.sh" else script.read_text() + (script.parent / "gpu.py").read_text()
                for flag in re.findall(r"(?:^|\s)\[?(--[\w-]+)", m[2]):
                    n += 1
                    if f'"{flag}"' not in src:
                        bad.append(f"{p.name}: {m[1]} has no {flag}")
    assert not bad, "\n".join(bad)
    assert n >= 10


def _table_after(text: str, marker: str) -> list[list[str]]:
    """The cells of the markdown table that follows ``marker``, header and separator dropped."""
    lines = text.split(marker, 1)[1].splitlines()[1:]
    if not lines[0].startswith("|"):  # marker in the sentence before the table: the table starts below it
        lines = lines[next(i for i, line in enumerate(lines) if line.startswith("|")) + 1:]
    rows = []
    for line in lines[1:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_backbone_pages_tables_match_the_backbone_configs():
    """docs/backbones.md: the family table names every ``configs/backbone/*.yaml`` under its ``family``, and the
    field table names exactly the keys the configs have."""
    import yaml

    text = (REPO / "docs" / "backbones.md").read_text()
    configs = {f.name: yaml.safe_load(f.read_text()) for f in (REPO / "configs" / "backbone").glob("*.yaml")}
    listed = {}
    for row in _table_after(text, "| family (`backbone.family`) |"):
        family = row[0].strip("`")
        for name in re.findall(r"`(\w+\.yaml)`", row[1]):
            listed[name] = family
    assert listed == {n: c["family"] for n, c in configs.items()}
    fields = {row[0].strip("`") for row in _table_after(text, "Fields of ")}
    fields = {f for cell in fields for f in re.split(r"`?, `?", cell)}
    assert fields == set().union(*configs.values()), fields ^ set().union(*configs.values())


def test_named_tests_exist():
    """``tests/<file>.py::<test>`` in the pages names a test function of that file."""
    n = 0
    for p in PAGES:
        for path, name in re.findall(r"(tests/\w+\.py)::(\w+)", p.read_text()):
            n += 1
            src = (REPO / path).read_text()
            assert re.search(rf"^def {name}\(", src, flags=re.MULTILINE), f"{p.name}: {path}::{name}"
    assert n >= 2


def test_the_readmes_example_output_is_what_a_run_prints():
    """The README's output of command 1 is, line for line, what ``results_markdown`` prints for the numbers it shows
    (header, chance and majority, the table, best layer, throughput, the demo note), after the two start lines."""
    from value_pl.driver.results import results_markdown

    readme = (REPO / "README.md").read_text()
    block = readme.split("## Set-up: two commands", 1)[1].split("```\n[value-pl]", 1)[1].split("```", 1)[0]
    start, body = block.split("\n", 2)[:2], block.split("\n", 2)[2]
    assert start[0].startswith(" backbone minilm-uniter: text side from the pretrained BERT-family model at ")
    assert start[0].endswith("; image embeddings randomly initialised (seed 0)")
    assert start[1] == "[value-pl] data: synthetic demo shards with planted signal (a smoke test, not a result)"
    head = re.match(r"# (\w+) / prober=(\w+) / backbone=([\w-]+) \((pretrained|untrained)\) / seed=(\d+)\n", body)
    chance = re.search(r"chance \(1/C\) = ([\d.]+)%, majority class = ([\d.]+)%", body)
    rows = re.findall(r"^\| (\d+) \| (\w+) \| ([^|]+) \| ([\d.]+) \| ([\d.]+) \|$", body, flags=re.MULTILINE)
    best = re.search(r"best by validation: (\w+) -> test ([\d.]+)%", body)
    tp = re.search(r"Training throughput: (\d+) samples/s, waiting for data (\d+)% ", body)
    assert head and chance and rows and best and tp
    res = {"task": head[1], "prober": head[2], "backbone": {"name": head[3], "pretrained": head[4] == "pretrained"},
           "seed": int(head[5]), "control": False, "chance": float(chance[1]) / 100, "majority": float(chance[2]) / 100,
           "layers": [{"layer": int(k), "name": n, "title": t, "val_acc": float(v) / 100, "test_acc": float(te) / 100}
                      for k, n, t, v, te in rows],
           "best": {"name": best[1], "test_acc": float(best[2]) / 100},
           "throughput": {"train": {"samples_per_s": float(tp[1]), "data_wait_frac": float(tp[2]) / 100}},
           "data": {"synthetic": True}}
    assert results_markdown(res) == body


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module, not a submodule
        return False


def test_python_names_in_the_pages_exist():
    """``value_pl.<module>[.<name>]`` and ``<Class>.<attribute>`` of value_pl's classes named in the pages exist."""
    import importlib

    from value_pl.backbones.base import BackboneOutput
    from value_pl.backbones.capture import CaptureSpec
    from value_pl.probers.module import ProbeModule

    classes = {"BackboneOutput": BackboneOutput, "CaptureSpec": CaptureSpec, "ProbeModule": ProbeModule}
    n = 0
    for p in PAGES:
        text = p.read_text()
        for dotted in re.findall(r"`(value_pl(?:\.\w+)+)`", text):
            parts = dotted.split(".")
            k = next(k for k in range(len(parts), 0, -1) if _is_module(".".join(parts[:k])))
            obj = importlib.import_module(".".join(parts[:k]))
            for attr in parts[k:]:
                assert hasattr(obj, attr), f"{p.name}: {dotted}"
                obj = getattr(obj, attr)
            n += 1
        for cls, attr in re.findall(rf"`({'|'.join(classes)})\.(\w+)`", text):
            fields = getattr(classes[cls], "__dataclass_fields__", {})
            assert hasattr(classes[cls], attr) or attr in fields, f"{p.name}: {cls}.{attr}"
            n += 1
    assert n >= 6


def test_every_documented_group_option_exists():
    """``group=option`` anywhere in the pages' code (`` `backbone=uniter_untrained` ``, ``logger=wandb|csv|none``,
    ``prober=senteval_*``) names a config file of that group."""
    from value_pl import CONFIG_DIR

    groups = {d.name for d in Path(CONFIG_DIR).iterdir() if d.is_dir()}
    bad, n = [], 0
    for p in PAGES:
        for s in _snippets(p.read_text()):
            for m in re.finditer(r"(?:^|[\s'\"])(\w+)=([\w*|,]+)(?=$|[\s'\")])", s):
                if m[1] not in groups:
                    continue
                for option in re.split(r"[|,]", m[2]):
                    n += 1
                    if option and not list((Path(CONFIG_DIR) / m[1]).glob(f"{option}.yaml")):
                        bad.append(f"{p.name}: {m[1]}={option} in `{s.strip()[:100]}`")
    assert not bad, "\n".join(bad)
    assert n >= 50
