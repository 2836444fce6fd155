"""Benchmark tooling for bertkern.

``python -m bertkern.bench report out.json [--out DIR] [--title TITLE]`` turns the JSON that
``pytest benchmarks --benchmark-only --benchmark-json=out.json`` writes into a markdown report
(``report.md``) and a speedup plot (``speedup.png``); see :mod:`bertkern.bench.report`.

Nothing here imports torch beyond what ``import bertkern`` already does: reading the JSON does not
need it, and matplotlib is only imported when a plot is drawn.
"""

__all__ = ["report"]
