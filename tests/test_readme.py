import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

CMD1 = "pip install -e . && python -m value_pl.train prober=layer_emb task=vrc"
CMD2 = 'pip install -e ".[test]" && python -m pytest -q'


def test_setup_is_two_commands_and_ci_runs_the_test_command():
    block = README.split("## Set-up: two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [l for l in block.splitlines() if l.strip() and not l.startswith("#")]
    assert cmds == [CMD1, CMD2]
    ci = (REPO / ".ci" / "run").read_text()
    assert CMD2 in ci.splitlines()


def test_every_module_the_readme_runs_exists():
    mods = set(re.findall(r"python -m (value_pl(?:\.\w+)+)", README))
    assert {"value_pl.train", "value_pl.eval", "value_pl.analyze", "value_pl.compare", "value_pl.report",
            "value_pl.extract", "value_pl.datasets.build", "value_pl.datasets.demo"} <= mods
    for m in mods:
        assert importlib.util.find_spec(m) is not None, m


def test_readme_images_exist():
    for img in re.findall(r"\]\((docs/img/[^)]+)\)", README):
        assert (REPO / img).exists(), img


def test_required_sections():
    for title in ("Pointing at your own checkpoints", "Build shards from the real datasets",
                  "Compare checkpoints during pretraining", "Performance", "Reproducing the paper's tables"):
        assert title in README, title
