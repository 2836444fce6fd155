"""Benchmark tooling for bertkern.

``python -m bertkern.bench report out.json [--out DIR] [--title TITLE]`` turns the JSON that
``pytest benchmarks --benchmark-only --benchmark-json=out.json`` writes into a markdown report
(``report.md``) and a speedup plot (``speedup.png``); see :mod:`bertkern.bench.report`.

Modules (each imports only those below it; ``__main__`` is the command line, imported by none):

- ``records``: load a pytest-benchmark JSON, one ``Row`` per benchmark, groups, machine facts
- ``markdown``: report.md's text (tables, summary, machine lines), from records
- ``plot``: speedup.png (matplotlib, imported only when drawing), from records
- ``report``: ``render()`` writes report.md + speedup.png with markdown and plot
- ``sass``, ``gpu_model``: the static GPU cost model (``gpu-model``); ``gpu_check``: ``gpu-check``

Nothing here imports torch beyond what ``import bertkern`` already does: reading the JSON does not
need it, and matplotlib is only imported when a plot is drawn.
"""

__all__ = ["report"]
