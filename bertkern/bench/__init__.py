"""Benchmark tooling for bertkern.

``python -m bertkern.bench report out.json [--out DIR] [--machine NAME] [--allow-dirty]`` turns
the JSON that ``pytest benchmarks --benchmark-only --benchmark-json=out.json`` writes into a
results folder (default ``benchmarks/results/<machine>-<date>/``): the JSON as results.json,
COMMIT, report.md, encoder_speedup.png and speedup.png; a run on a dirty tree is refused. See
:mod:`bertkern.bench.report`.

Modules (each imports only those below it; ``__main__`` is the command line, imported by none):

- ``records``: load a pytest-benchmark JSON, one ``Row`` per benchmark, groups, machine facts
- ``markdown``: report.md's text (tables, summary, machine lines), from records
- ``stats``: median, IQR, paired bootstrap interval of a ratio of medians (the suites use it)
- ``plot``: encoder_speedup.png and speedup.png (matplotlib, imported only when drawing)
- ``report``: ``publish()`` writes the results folder, ``render()`` report.md + the plots
- ``sass``, ``gpu_model``: the static GPU cost model (``gpu-model``); ``gpu_check``: ``gpu-check``

Nothing here imports torch beyond what ``import bertkern`` already does: reading the JSON does not
need it, and matplotlib is only imported when a plot is drawn.
"""

__all__ = ["report"]
