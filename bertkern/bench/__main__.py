"""Command line of bertkern.bench.

    python -m bertkern.bench report out.json [--out DIR] [--title TITLE]

``out.json`` is what ``pytest benchmarks --benchmark-only --benchmark-json=out.json`` writes.
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bertkern.bench",
                                     description="bertkern benchmark tooling")
    sub = parser.add_subparsers(dest="command", title="commands")
    sub.required = True
    rep = sub.add_parser("report", help="markdown report + speedup plot from a pytest-benchmark JSON",
                         description="Write report.md (also printed) and speedup.png from the JSON "
                                     "that pytest-benchmark's --benchmark-json writes.")
    rep.add_argument("json", help="pytest-benchmark JSON file (--benchmark-json=...)")
    rep.add_argument("--out", metavar="DIR", default=None,
                     help="output folder (default: the JSON file's folder)")
    rep.add_argument("--title", default=None, help="report and plot title")
    args = parser.parse_args(argv)

    from bertkern.bench import report

    if args.command == "report":
        return report.run_cli(args.json, args.out, args.title)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


if __name__ == "__main__":
    sys.exit(main())
