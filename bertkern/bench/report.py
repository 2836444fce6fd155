"""A benchmark report from a pytest-benchmark JSON file: report.md and the plots in one folder.

    pytest benchmarks --benchmark-only --benchmark-json=out.json
    python -m bertkern.bench report out.json [--out DIR] [--machine NAME] [--allow-dirty] [--title TITLE]

or from Python::

    from bertkern.bench.report import publish, render
    result = publish("out.json")            # benchmarks/results/<machine>-<YYYY-MM-DD>/, full folder
    markdown, png = render("out.json", "reports/")   # report.md + plots only; png None when skipped

``publish`` (what the command line runs) writes a reproducible results folder:

    <folder>/results.json          the raw pytest-benchmark JSON, copied unchanged
    <folder>/COMMIT                the full commit hash the run was made at (commit_info.id), one line
    <folder>/report.md             the report (below)
    <folder>/encoder_speedup.png   encoder speedup vs padding fraction (the chart for the README)
    <folder>/speedup.png           the detailed plot (every suite vs padding fraction / seqlen)

and refuses (PublishError) when pytest-benchmark's commit_info says the tree was dirty or names
no commit, unless allow_dirty, in which case report.md says so. The default folder is
``benchmarks/results/<machine>-<YYYY-MM-DD>`` (records.machine_slug / records.run_date).

``report.md`` holds the machine and commit, a summary of bertkern's speedups per group (ratios of
medians with their 95% intervals; ``(n.s.)`` marks an interval containing 1.0) and one table per
group (bertkern.bench.markdown). Reading the JSON is bertkern.bench.records, which lists the keys
the suites in benchmarks/ record. matplotlib is optional: without it, or without rows that carry
the needed keys, a plot is skipped with a note and the markdown is still written.

Only the standard library is imported here (matplotlib lazily, when plotting).
"""
import os
import shutil

from bertkern.bench import markdown, plot, records
from bertkern.bench.records import ReportError

__all__ = ["COMMIT_NAME", "ENCODER_PLOT_NAME", "JSON_NAME", "PLOT_NAME", "REPORT_NAME", "RESULTS_ROOT",
           "PublishError", "Published", "ReportError", "default_folder", "output_dir", "publish", "render"]

REPORT_NAME = "report.md"
PLOT_NAME = "speedup.png"
ENCODER_PLOT_NAME = "encoder_speedup.png"
JSON_NAME = "results.json"
COMMIT_NAME = "COMMIT"
RESULTS_ROOT = os.path.join("benchmarks", "results")


class PublishError(ReportError):
    """The run cannot be published as a reproducible result (dirty tree, no commit)."""


def output_dir(json_path, out_dir=None):
    """out_dir, or by default the JSON file's folder."""
    if out_dir is not None:
        return os.fspath(out_dir)
    return os.path.dirname(os.path.abspath(os.fspath(json_path)))


def render(json_path, out_dir=None, title=None, allow_dirty=False, extra_lines=(), source=None):
    """Write report.md, encoder_speedup.png and speedup.png for a pytest-benchmark JSON file.

    out_dir defaults to the JSON file's folder and is created if needed. Returns
    (markdown text, path of speedup.png or None when that plot was skipped: the markdown says
    why). Raises ReportError for a missing, unreadable or non-pytest-benchmark file. Does not
    check the commit (publish does); a dirty run is flagged in the report.
    """
    text, png, _ = _render(json_path, out_dir, title, allow_dirty, extra_lines, source)
    return text, png


def _render(json_path, out_dir, title, allow_dirty, extra_lines, source):
    """render's work; returns (text, speedup.png or None, encoder_speedup.png or None)."""
    data = records.load(json_path)
    out_dir = output_dir(json_path, out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create output folder {out_dir}: {e}") from None
    enc_png, enc_note = plot.draw_encoder(data, os.path.join(out_dir, ENCODER_PLOT_NAME), title=None)
    png, note = plot.draw(data, os.path.join(out_dir, PLOT_NAME), title=title)
    plot_lines = []
    if enc_png:
        plot_lines.append(f"![bertkern.Encoder speedup vs padding fraction]({ENCODER_PLOT_NAME})")
    elif records.rows_of(data) and "no bertkern row" not in enc_note:
        plot_lines.append(f"_{enc_note}_")
    plot_lines.append(f"![bertkern speedup]({PLOT_NAME})" if png else f"_{note}_")
    text = markdown.document(data, source=source or os.path.basename(os.fspath(json_path)), title=title,
                             plot_note="\n\n".join(plot_lines), allow_dirty=allow_dirty,
                             extra_lines=extra_lines)
    with open(os.path.join(out_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text, png, enc_png


def default_folder(data, machine=None, json_path=None, root=RESULTS_ROOT):
    """root/<machine>-<YYYY-MM-DD>: machine defaults to records.machine_slug(data), the date to
    the run's (records.run_date), else the JSON file's modification date (UTC)."""
    name = records.short_name(machine) if machine else records.machine_slug(data)
    if not name:
        raise ReportError(f"--machine {machine!r} has no letters or digits to name a folder with")
    date = records.run_date(data)
    if date is None and json_path is not None:
        import datetime

        date = datetime.datetime.fromtimestamp(os.path.getmtime(os.fspath(json_path)),
                                               datetime.timezone.utc).strftime("%Y-%m-%d")
    return os.path.join(os.fspath(root), f"{name}-{date or 'undated'}")


class Published:
    """What publish wrote: folder, text (report.md), commit, dirty, files {name: path}, notes."""

    def __init__(self, folder, text, commit, dirty, files, notes):
        self.folder, self.text, self.commit, self.dirty, self.files, self.notes = (
            folder, text, commit, dirty, files, notes)


def publish(json_path, out_dir=None, machine=None, allow_dirty=False, title=None, root=RESULTS_ROOT):
    """Write the reproducible results folder (see the module docstring) and return a Published.

    Raises PublishError, before writing anything, when commit_info marks the tree dirty or
    names no commit and allow_dirty is False; ReportError for unreadable input.
    """
    data = records.load(json_path)
    commit, dirty = records.commit_info(data)
    if not allow_dirty:
        if commit is None:
            raise PublishError(f"{json_path} records no commit (commit_info has no git id): run the benchmarks "
                               "inside the git checkout, or pass --allow-dirty to render it anyway")
        if dirty:
            raise PublishError(f"{json_path} was run on a dirty tree (commit_info.dirty: uncommitted changes "
                               f"to tracked files at {commit[:12]}): commit them and rerun the benchmarks, "
                               "or pass --allow-dirty to render it anyway (the report then says so)")
    folder = os.fspath(out_dir) if out_dir is not None else default_folder(data, machine, json_path, root)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create output folder {folder}: {e}") from None
    notes = []
    raw = os.path.join(folder, JSON_NAME)
    try:
        same = os.path.exists(raw) and os.path.samefile(os.fspath(json_path), raw)
        if not same:
            if os.path.exists(raw):
                notes.append(f"replaced {raw}")
            shutil.copyfile(os.fspath(json_path), raw)
        with open(os.path.join(folder, COMMIT_NAME), "w", encoding="utf-8") as f:
            f.write((commit or "unknown") + "\n")
    except OSError as e:
        raise ReportError(f"cannot write into {folder}: {e}") from None
    lines = []
    if commit:
        lines.append(f"- **Reproduce:** `git checkout {commit}`, then `pytest benchmarks --benchmark-only "
                     f"--benchmark-json=out.json` and `python -m bertkern.bench report out.json`; this "
                     f"report: `python -m bertkern.bench report {JSON_NAME} --out .` in this folder")
    else:
        lines.append("- **Commit:** none recorded (rendered with `--allow-dirty`): this run cannot be traced "
                     "to a commit; COMMIT says `unknown`")
    text, png, enc_png = _render(raw, folder, title, allow_dirty and (dirty or commit is None), lines, JSON_NAME)
    files = {name: os.path.join(folder, name) for name in (JSON_NAME, COMMIT_NAME, REPORT_NAME)}
    for name, path in ((ENCODER_PLOT_NAME, enc_png), (PLOT_NAME, png)):
        if path:
            files[name] = path
        elif os.path.exists(os.path.join(folder, name)):  # an older file of that name is not this run's
            notes.append(f"{os.path.join(folder, name)} is left from an earlier report (no such plot this time)")
    return Published(folder, text, commit, dirty, files, notes)
