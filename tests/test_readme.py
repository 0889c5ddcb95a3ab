"""The README is the front door and docs/ holds the rest: the set-up commands, the modules, links, images and
file paths they name all exist, and the sections other pages and configs point to are where they say."""
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS, REPO / "shards" / "README.md"]

CMD1 = "pip install -e . && python -m value_pl.train prober=layer_emb task=vrc"
CMD2 = 'pip install -e ".[test]" && python -m pytest -q'

DOC_PAGES = ("backbones", "datasets", "probing", "analyses", "reproducing", "compare", "multi-gpu",
             "performance", "layout")


def _text(p: Path) -> str:
    return p.read_text()


def _slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    t = re.sub(r"[`*_]", "", title.strip().lower())
    t = re.sub(r"[^\w\- ]", "", t)
    return t.replace(" ", "-")


def _anchors(p: Path) -> set[str]:
    out, fenced = set(), False
    for line in _text(p).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.add(_slug(line.lstrip("#")))
    return out


def _links(p: Path) -> list[str]:
    """Targets of markdown links and images outside code blocks, minus web addresses."""
    text = re.sub(r"```.*?```", "", _text(p), flags=re.DOTALL)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_setup_is_two_commands_and_ci_runs_the_test_command():
    block = README.split("## Set-up: two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [l for l in block.splitlines() if l.strip() and not l.startswith("#")]
    assert cmds == [CMD1, CMD2]
    ci = (REPO / ".ci" / "run").read_text()
    assert CMD2 in ci.splitlines()


def test_every_module_the_readme_and_docs_run_exists():
    mods = set()
    for p in [REPO / "README.md", *DOCS]:
        mods |= set(re.findall(r"python -m (value_pl(?:\.\w+)+)", _text(p)))
    assert {"value_pl.train", "value_pl.eval", "value_pl.analyze", "value_pl.compare", "value_pl.report",
            "value_pl.extract", "value_pl.datasets.build", "value_pl.datasets.demo"} <= mods
    for m in mods:
        assert importlib.util.find_spec(m) is not None, m


def test_the_readme_links_every_docs_page_and_every_link_resolves():
    linked = {t.split("#")[0] for t in _links(REPO / "README.md")}
    for name in DOC_PAGES:
        assert f"docs/{name}.md" in linked, name
    for p in PAGES:
        for t in _links(p):
            path, _, anchor = t.partition("#")
            target = (p.parent / path).resolve() if path else p
            assert target.exists(), f"{p.relative_to(REPO)}: broken link {t}"
            if anchor and target.suffix == ".md":
                assert anchor in _anchors(target), f"{p.relative_to(REPO)}: no heading for {t}"


def test_images_exist():
    n = 0
    for p in PAGES:
        for img in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", _text(p)):
            assert (p.parent / img).exists(), f"{p.relative_to(REPO)}: {img}"
            n += 1
    assert n >= 3  # the analysis figures in docs/analyses.md


def test_file_paths_named_in_the_docs_exist():
    """`value_pl/...`, `configs/...`, `tests/...`, `benchmarks/...` paths in backticks (with {a,b} lists)."""
    pat = r"`((?:value_pl|configs|tests|benchmarks|examples|shards)/[\w./{},-]*)`"
    for p in PAGES:
        for ref in re.findall(pat, _text(p)):
            if "*" in ref or "<" in ref:
                continue
            m = re.match(r"(.*)\{([^}]*)\}(.*)", ref)
            for path in ([m[1] + x + m[3] for x in m[2].split(",")] if m else [ref]):
                assert (REPO / path).exists(), f"{p.relative_to(REPO)}: {path}"


def test_readme_is_a_front_door():
    assert len(README.encode()) <= 12_500


def test_required_sections_are_in_their_pages():
    where = {
        "backbones.md": ("Pointing at your own checkpoints", "Canonical names", "LXMERT layer numbering",
                         "Untrained twins", "Security: what is loaded how"),
        "datasets.md": ("Build shards from the real datasets",),
        "probing.md": ("How a run works", "Probers", "Protocols"),
        "analyses.md": ("Training-free analyses",),
        "compare.md": ("Compare checkpoints during pretraining", "Time per checkpoint"),
        "reproducing.md": ("Reproducing the paper's tables",),
        "multi-gpu.md": ("Several GPUs and nodes (DDP)",),
        "performance.md": ("Performance",),
        "layout.md": ("Repository layout", "The layering rule", "Tests and CI"),
    }
    for page, titles in where.items():
        heads = [l.lstrip("#").strip() for l in _text(REPO / "docs" / page).splitlines() if l.startswith("#")]
        for title in titles:
            assert any(h.startswith(title) for h in heads), (page, title)
    assert "## Set-up: two commands" in README


def test_layout_page_lists_every_module():
    """The tree in docs/layout.md (two spaces per level) names exactly the package's modules."""
    block = _text(REPO / "docs" / "layout.md").split("## `value_pl/`", 1)[1].split("```", 2)[1]
    listed, stack = set(), []
    for line in block.splitlines()[1:]:
        m = re.match(r"( *)(\S+)", line)
        if not m:
            continue
        depth = len(m[1]) // 2
        stack = stack[:depth] + [m[2].rstrip("/")]
        if m[2].endswith(".py"):
            listed.add("/".join(stack))
    have = {str(py.relative_to(REPO)) for py in (REPO / "value_pl").rglob("*.py") if py.name != "__init__.py"}
    have.add("value_pl/__init__.py")
    assert listed == have


def _sweep_dirs() -> dict[str, str]:
    """experiment name -> the directory its multirun writes below (``hydra.sweep.dir`` up to the timestamp);
    the training-free sweeps of ``configs/analyze_experiment/`` (``analyze_experiment=paper``) included."""
    import yaml

    out = {}
    for f in sorted([*(REPO / "configs" / "experiment").glob("*.yaml"),
                     *(REPO / "configs" / "analyze_experiment").glob("*.yaml")]):
        d = ((yaml.safe_load(f.read_text()) or {}).get("hydra") or {}).get("sweep", {}).get("dir")
        if d:
            out[f.stem] = d.split("/${", 1)[0]
    return out


def _check_reports(where: str, experiments: set[str], text: str, sweeps: dict[str, str]) -> list[str]:
    from value_pl.report import LAYOUTS

    cmds = re.findall(r"python -m value_pl\.report ((?:multirun/\w+ ?)+)(?:--layout ([\w,]+))?", text)
    made = {sweeps[e] for e in experiments if e in sweeps}
    for dirs, layout in cmds:
        for d in dirs.split():
            assert d in made, f"{where}: report on {d}, which no experiment it names ({sorted(experiments)}) creates"
        assert set(layout.split(",")) <= set(LAYOUTS), f"{where}: --layout {layout}"
    # the shorthand beside a command: "(fig4 runs: `multirun/fig4 --layout table9`)"
    for d, layout in re.findall(r"`(multirun/\w+) --layout ([\w,]+)`", text):
        assert d in made and set(layout.split(",")) <= set(LAYOUTS), f"{where}: {d} --layout {layout}"
    return [d for dirs, _ in cmds for d in dirs.split()]


def test_report_commands_point_at_directories_their_experiments_create():
    """docs/reproducing.md's table and the experiment configs' comments: every ``python -m value_pl.report
    multirun/X`` reports a directory that an experiment named beside it writes (its ``hydra.sweep.dir``)."""
    sweeps = _sweep_dirs()
    assert sweeps["table3"] == "multirun/table3" and sweeps["table8"] == "multirun/table8"
    rows = [l for l in _text(REPO / "docs" / "reproducing.md").splitlines()
            if l.startswith("|") and "value_pl.report" in l]
    assert len(rows) >= 10
    for row in rows:
        _, paper, _, command, report, _ = row.split("|")
        _check_reports(f"reproducing.md {paper.strip()}", set(re.findall(r"experiment=(\w+)", command)), report,
                       sweeps)
    from value_pl.report import LAYOUTS

    for f in sorted((REPO / "configs" / "experiment").glob("*.yaml")):
        comments = "\n".join(l for l in f.read_text().splitlines() if l.startswith("#"))
        named = set(re.findall(r"experiment=(\w+)", comments))
        reported = _check_reports(f"configs/experiment/{f.name}", named, comments, sweeps)
        if f.stem in LAYOUTS:  # each table's config says how to report it
            assert re.search(rf"--layout (\w+,)*{f.stem}\b", comments), f.name
            assert reported, f.name
