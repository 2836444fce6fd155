"""Command line of bertkern.bench.

    python -m bertkern.bench report out.json [--out DIR] [--machine NAME] [--allow-dirty] [--title TITLE]
    python -m bertkern.bench gpu-model [--arch 80,90] [--out DIR] [--quick] [--workers N] [--cuda-objects DIR]
    python -m bertkern.bench gpu-check [--out FILE] [--model JSON] [--skip-tests]

``out.json`` is what ``pytest benchmarks --benchmark-only --benchmark-json=out.json`` writes;
``report`` turns it into a reproducible results folder (bertkern.bench.report.publish):

    results.json          the raw JSON, copied unchanged
    COMMIT                the full commit hash the run was made at (the JSON's commit_info.id)
    report.md             the report (also printed): medians with IQR, ratios of medians with
                          95% intervals, ``(n.s.)`` where an interval contains 1.0
    encoder_speedup.png   encoder speedup vs padding fraction, train and inference (README chart)
    speedup.png           the detailed plot, every suite

The folder is ``--out DIR``, by default ``benchmarks/results/<machine>-<YYYY-MM-DD>/`` under the
current directory (run it from the repository root):

- ``<machine>``: ``--machine NAME`` (made file-name safe: lowercase, other characters to ``-``),
  else a short name of the JSON's CPU (machine_info.cpu.brand_raw without "(R)", "CPU", "@ 2.70GHz",
  "96-Core Processor": ``intel-xeon-platinum-8481c``, ``amd-epyc-9b14``), followed by the GPU's short
  name when a row ran on CUDA (``...-nvidia-h100-80gb-hbm3``); ``unknown-machine`` when the JSON
  names no CPU.
- ``<YYYY-MM-DD>``: the run's date, the JSON's ``datetime`` (UTC; else commit_info's time, else
  the file's modification date).

The command refuses (exit status 1, nothing written) a JSON whose commit_info says the tree was
dirty (pytest-benchmark's ``git describe --dirty``: uncommitted changes to tracked files) or that
names no commit; ``--allow-dirty`` renders it anyway and report.md says so. Regenerating a
committed report: ``python -m bertkern.bench report benchmarks/results/X/results.json --out
benchmarks/results/X`` (the JSON is not copied onto itself).
``gpu-model`` is the static (no GPU) cost model of bertkern.bench.gpu_model, anchored on
torch's bundled FlashAttention-2. ``gpu-check`` (bertkern.bench.gpu_check) runs the CUDA tests and
benchmarks on a machine with an NVIDIA GPU and sets the measurements next to the model's figures;
without a GPU it exits with status 2.
"""
import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bertkern.bench",
                                     description="bertkern benchmark tooling")
    sub = parser.add_subparsers(dest="command", title="commands")
    sub.required = True
    rep = sub.add_parser("report", help="results folder (JSON, COMMIT, report, plots) from a pytest-benchmark JSON",
                         description="Write a results folder from the JSON that pytest-benchmark's "
                                     "--benchmark-json writes: results.json (a copy), COMMIT, report.md "
                                     "(also printed), encoder_speedup.png and speedup.png. Refuses a run "
                                     "made on a dirty tree unless --allow-dirty.")
    rep.add_argument("json", help="pytest-benchmark JSON file (--benchmark-json=...)")
    rep.add_argument("--out", metavar="DIR", default=None,
                     help="output folder (default: benchmarks/results/<machine>-<YYYY-MM-DD>/ under the "
                          "current directory, from the JSON)")
    rep.add_argument("--machine", metavar="NAME", default=None,
                     help="machine part of the default folder name (default: the JSON's CPU short name, "
                          "plus the GPU's for CUDA rows)")
    rep.add_argument("--allow-dirty", action="store_true",
                     help="render a run whose commit_info says the tree was dirty (or names no commit); "
                          "the report says so")
    rep.add_argument("--title", default=None, help="report and plot title")
    gm = sub.add_parser("gpu-model", help="static GPU cost model (no GPU needed), FA2 as the anchor",
                        description="Compile every attention tile and the CUDA C++ kernels for sm_80 / "
                                    "sm_90, read the SASS of those and of torch's FlashAttention-2 "
                                    "kernels, and write a modeled report (report.md + gpu_model.json).")
    gm.add_argument("--arch", default="80,90", help="comma-separated SM archs (default 80,90)")
    gm.add_argument("--out", metavar="DIR", default=None,
                    help="output folder (default benchmarks/results/gpu-model/)")
    gm.add_argument("--quick", action="store_true",
                    help="fp16 only: just the configs the summary needs")
    gm.add_argument("--workers", type=int, default=2, help="parallel compiles (default 2)")
    gm.add_argument("--cuda-objects", metavar="DIR", default=None,
                    help="read the CUDA kernels' SASS from the object files / cubins in DIR (e.g. "
                         "build/temp*/csrc/cuda of a CUDA build of the current csrc/cuda) instead of "
                         "compiling csrc/cuda with nvcc (the default) or reading bertkern/_C*.so")
    gc = sub.add_parser("gpu-check", help="CUDA tests + benchmarks on this GPU, next to the model",
                        description="On a machine with an NVIDIA GPU: run the CUDA tests and the CUDA "
                                    "benchmarks, print measured TFLOP/s and GB/s next to the static "
                                    "model's figures, and write one JSON. Exits 2 without a GPU.")
    gc.add_argument("--out", metavar="FILE", default="gpu-check.json",
                    help="JSON report (default gpu-check.json)")
    gc.add_argument("--model", metavar="JSON", default=None,
                    help="gpu_model.json to compare with (default "
                         "benchmarks/results/gpu-model/gpu_model.json of the checkout)")
    gc.add_argument("--skip-tests", action="store_true", help="run the benchmarks only")
    args = parser.parse_args(argv)

    if args.command == "report":
        return _report(args.json, args.out, args.title, args.machine, args.allow_dirty)
    if args.command == "gpu-model":
        from bertkern.bench import gpu_model

        try:
            archs = tuple(int(a.strip().removeprefix("sm_")) for a in args.arch.split(",") if a.strip())
        except ValueError:
            parser.error(f"--arch: expected e.g. 80,90, got {args.arch!r}")
        bad = [a for a in archs if a not in gpu_model.GPU_OF_ARCH]
        if bad:
            parser.error(f"--arch: no model for sm_{bad[0]} (known: 80, 90)")
        return gpu_model.run_cli(archs, args.out, args.quick, args.workers, args.cuda_objects)
    if args.command == "gpu-check":
        from bertkern.bench import gpu_check

        return gpu_check.main(out=args.out, model_json=args.model, skip_tests=args.skip_tests)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


def _report(json_path, out_dir=None, title=None, machine=None, allow_dirty=False):
    """The `report` command: publish, print the markdown, say where the files went; exit status."""
    from bertkern.bench import report

    try:
        result = report.publish(json_path, out_dir, machine=machine, allow_dirty=allow_dirty, title=title)
    except report.ReportError as e:
        print(f"bertkern.bench report: error: {e}", file=sys.stderr)
        return 1
    try:
        text = result.text
        try:
            print(text)
        except UnicodeEncodeError:  # a console that cannot print a benchmark name: keep the files
            print(text.encode("ascii", "replace").decode("ascii"))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the files are written; stop printing quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    print(f"\nwrote {result.folder}{os.sep}", file=sys.stderr)
    for path in result.files.values():
        print(f"wrote {path}", file=sys.stderr)
    for line in text.splitlines():
        if line.startswith(("_Plot skipped", "_Encoder chart skipped")):
            print(line.strip("_"), file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.dirty or result.commit is None:
        print("warning: rendered with --allow-dirty: the run does not match a clean commit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
