"""``python -m value_pl.report RUN_DIRS... [--layout ...] [--out DIR] [--wandb]`` (see :mod:`value_pl.report`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import LAYOUTS, __doc__ as REPORT_DOC, build_tables, load_analyses, load_runs, log_wandb, write_tables


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m value_pl.report", description=REPORT_DOC.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (searched recursively for results.json and analyze runs' "
                                             "<analysis>.json / analysis.json)")
    ap.add_argument("--layout", default="auto", help=f"auto or comma-separated of: {', '.join(LAYOUTS)}")
    ap.add_argument("--out", default=None,
                    help="output directory (default: the first run directory / report); the markdown is report.md for "
                         "--layout auto, else report-<layouts>.md (e.g. report-table3-table8.md)")
    ap.add_argument("--wandb", action="store_true", help="also log the tables as W&B tables (WANDB_MODE honoured)")
    ap.add_argument("--project", default="value-pl")
    ap.add_argument("--group", default=None,
                    help="W&B group to log into (a multirun's group, e.g. table3-2024-05-01_10-00-00: its summary "
                         "then holds the tables)")
    a = ap.parse_args(argv)
    runs = load_runs(a.runs)
    analyses = load_analyses(a.runs)
    if not runs and not analyses:
        print("no results.json or analyze output found under " + " ".join(a.runs), file=sys.stderr)
        return 1
    tables = build_tables(runs, a.layout, analyses)
    first = Path(a.runs[0])
    out = Path(a.out) if a.out else (first.parent if first.is_file() else first) / "report"
    p = write_tables(tables, out, len(runs) + len({Path(r["_path"]).parent for r in analyses}), layout=a.layout)
    print(p.read_text())
    print(f"[value-pl] wrote {p} and {len(tables)} CSV file(s) to {out}")
    if a.wandb:
        log_wandb(tables, a.project, group=a.group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
