"""A benchmark report from a pytest-benchmark JSON file: report.md and speedup.png in one folder.

    pytest benchmarks --benchmark-only --benchmark-json=out.json
    python -m bertkern.bench report out.json [--out DIR] [--title TITLE]

or from Python::

    from bertkern.bench.report import render
    markdown, png = render("out.json", "reports/")   # png is None when the plot was skipped

``report.md`` holds the machine, a summary of bertkern's speedups per group and one table per
group (bertkern.bench.markdown); ``speedup.png`` plots speedup against padding fraction and
against sequence length (bertkern.bench.plot). Reading the JSON is bertkern.bench.records, which
lists the keys the suites in benchmarks/ record. matplotlib is optional: without it, or without
rows that carry the needed keys, the plot is skipped with a note and the markdown is still written.

Only the standard library is imported here (matplotlib lazily, when plotting).
"""
import os

from bertkern.bench import markdown, plot, records
from bertkern.bench.records import ReportError

__all__ = ["PLOT_NAME", "REPORT_NAME", "ReportError", "output_dir", "render"]

REPORT_NAME = "report.md"
PLOT_NAME = "speedup.png"


def output_dir(json_path, out_dir=None):
    """out_dir, or by default the JSON file's folder."""
    if out_dir is not None:
        return os.fspath(out_dir)
    return os.path.dirname(os.path.abspath(os.fspath(json_path)))


def render(json_path, out_dir=None, title=None):
    """Write report.md and speedup.png for a pytest-benchmark JSON file.

    out_dir defaults to the JSON file's folder and is created if needed. Returns
    (markdown text, path of the PNG or None when the plot was skipped: the markdown says why).
    Raises ReportError for a missing, unreadable or non-pytest-benchmark file.
    """
    data = records.load(json_path)
    out_dir = output_dir(json_path, out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create output folder {out_dir}: {e}") from None
    png, note = plot.draw(data, os.path.join(out_dir, PLOT_NAME), title=title)
    plot_line = f"![bertkern speedup]({PLOT_NAME})" if png else f"_{note}_"
    text = markdown.document(data, source=os.path.basename(os.fspath(json_path)), title=title,
                             plot_note=plot_line)
    with open(os.path.join(out_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text, png
