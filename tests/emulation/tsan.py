"""ThreadSanitizer builds and runs of the standalone emulation programs (tests/emulation/*.cpp),
shared by the tests/test_emulated_*.py files.

``tsan_probe(build_dir)`` returns a :class:`Tsan` runner, or a reason to skip (g++ without
libtsan, or a kernel TSan can't run on even under ``setarch -R``). ``Tsan.build`` starts a g++
build (cached by the content of everything it is built from); ``Tsan.finish`` waits for it;
``Tsan.run`` runs a binary with TSan's options (halt_on_error=0, exitcode=TSAN_EXITCODE).
"""
import hashlib
import os
import platform
import shutil
import subprocess

import torch

from tests.emulation.loader import CSRC, HERE as EMU_DIR

TSAN_FLAGS = ["-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread"]
TSAN_ENV_OPTIONS = "halt_on_error=0 exitcode=66 report_signal_unsafe=0"
TSAN_EXITCODE = 66


def _tsan_sources_digest(extra):
    """Hash of everything a TSan binary is built from, so unchanged binaries are reused."""
    h = hashlib.sha256(" ".join(TSAN_FLAGS + extra).encode())
    files = []
    for folder, suffixes in ((EMU_DIR, (".h", ".cuh", ".cpp")), (os.path.join(CSRC, "cuda"), (".cuh",))):
        files += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(suffixes))
    for path in files:
        h.update(path.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


class Tsan:
    """Builds TSan binaries (cached by content) and runs them, with `setarch -R` when this
    kernel's address-space layout needs it."""

    def __init__(self, build_dir, prefix):
        self.build_dir = build_dir
        self.prefix = prefix

    def build(self, sources, name, extra=()):
        extra = list(extra)
        out = os.path.join(self.build_dir, f"{name}-{_tsan_sources_digest(extra)}")
        if os.path.exists(out):
            return None, out
        tmp = f"{out}.tmp{os.getpid()}"
        cmd = ["g++", *TSAN_FLAGS, f"-I{EMU_DIR}", f"-I{CSRC}", *extra, *sources, "-o", tmp]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out

    @staticmethod
    def finish(proc, out):
        if proc is None:
            return out
        log = proc.communicate()[0].decode(errors="replace")
        tmp = f"{out}.tmp{os.getpid()}"
        assert proc.returncode == 0, f"TSan build of {out} failed:\n{log[-4000:]}"
        os.replace(tmp, out)
        # Drop binaries built from older sources.
        folder, name = os.path.split(out)
        stem = name.rsplit("-", 1)[0]
        for other in os.listdir(folder):
            if other.startswith(stem + "-") and other != name and ".tmp" not in other:
                try:
                    os.unlink(os.path.join(folder, other))
                except OSError:
                    pass
        return out

    def run(self, binary, *args, timeout=300, env=None):
        env = dict(os.environ, **(env or {}), TSAN_OPTIONS=TSAN_ENV_OPTIONS)
        proc = subprocess.run([*self.prefix, binary, *args], capture_output=True, env=env,
                              timeout=timeout)
        return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def tsan_probe(build_dir):
    """The TSan runner, or a reason to skip: g++ without libtsan, or a kernel TSan can't run on."""
    if shutil.which("g++") is None:
        return None, "g++ not found"
    src = os.path.join(build_dir, "probe.cpp")
    exe = os.path.join(build_dir, f"probe{os.getpid()}")
    with open(src, "w") as f:
        f.write("#include <thread>\nint main() { std::thread([] {}).join(); }\n")
    build = subprocess.run(["g++", *TSAN_FLAGS, src, "-o", exe], capture_output=True)
    if build.returncode != 0:
        return None, "g++ lacks -fsanitize=thread support: " + build.stderr.decode(errors="replace")[-500:]
    env = dict(os.environ, TSAN_OPTIONS=TSAN_ENV_OPTIONS)
    prefixes = [[]]
    if shutil.which("setarch"):
        # "FATAL: ThreadSanitizer: unexpected memory mapping" on kernels with high ASLR entropy.
        prefixes.append(["setarch", platform.machine(), "-R"])
    failures = []
    try:
        for prefix in prefixes:
            proc = subprocess.run([*prefix, exe], capture_output=True, env=env, timeout=60)
            err = proc.stderr.decode(errors="replace")
            if proc.returncode == 0 and "ThreadSanitizer" not in err:
                return Tsan(build_dir, prefix), None
            failures.append(f"{' '.join(prefix) or '(plain)'}: rc={proc.returncode} {err[-300:]}")
    finally:
        os.unlink(exe)
    return None, "TSan binaries cannot run here: " + " | ".join(failures)


def assert_instrumented(binary):
    with open(binary, "rb") as f:
        assert b"__tsan_init" in f.read(), f"{binary} is not TSan-instrumented"
