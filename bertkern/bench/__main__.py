"""Command line of bertkern.bench.

    python -m bertkern.bench report out.json [--out DIR] [--title TITLE]
    python -m bertkern.bench gpu-model [--arch 80,90] [--out DIR] [--quick] [--workers N] [--cuda-objects DIR]
    python -m bertkern.bench gpu-check [--out FILE] [--model JSON] [--skip-tests]

``out.json`` is what ``pytest benchmarks --benchmark-only --benchmark-json=out.json`` writes;
``report`` turns it into report.md and speedup.png (bertkern.bench.report).
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
    rep = sub.add_parser("report", help="markdown report + speedup plot from a pytest-benchmark JSON",
                         description="Write report.md (also printed) and speedup.png from the JSON "
                                     "that pytest-benchmark's --benchmark-json writes.")
    rep.add_argument("json", help="pytest-benchmark JSON file (--benchmark-json=...)")
    rep.add_argument("--out", metavar="DIR", default=None,
                     help="output folder (default: the JSON file's folder)")
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
        return _report(args.json, args.out, args.title)
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


def _report(json_path, out_dir=None, title=None):
    """The `report` command: render, print the markdown, say where the files went; exit status."""
    from bertkern.bench import report

    try:
        text, png = report.render(json_path, out_dir, title)
    except report.ReportError as e:
        print(f"bertkern.bench report: error: {e}", file=sys.stderr)
        return 1
    try:
        try:
            print(text)
        except UnicodeEncodeError:  # a console that cannot print a benchmark name: keep the files
            print(text.encode("ascii", "replace").decode("ascii"))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the files are written; stop printing quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    md_path = os.path.join(report.output_dir(json_path, out_dir), report.REPORT_NAME)
    print(f"\nwrote {md_path}", file=sys.stderr)
    if png:
        print(f"wrote {png}", file=sys.stderr)
    else:
        note = next((line.strip("_") for line in text.splitlines() if line.startswith("_Plot skipped")), "")
        print(note or "plot skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
