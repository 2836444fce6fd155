"""SASS disassembly and parsing for the static GPU cost model (bertkern.bench.gpu_model).

What it does, with no GPU: disassemble a cubin (or the cubins embedded in a shared library) with
``cuobjdump -sass`` (the one Triton bundles, else the one on PATH), split the listing into
functions, find loops (a loop is the address range [target, branch] of a backward ``BRA``),
classify every opcode into an execution pipe, and count a loop body's work: warp-instructions
per pipe, tensor-core FLOPs from the MMA shapes in the opcodes, and the bytes that the
L1/shared-memory data path moves.

Pipes (the classes the model charges separately):
    tensor  HMMA / HGMMA / IMMA / IGMMA / DMMA / HFMA2.MMA-free tensor ops (FLOPs from the shape)
    mufu    MUFU (ex2, lg2, rcp, rsq, sin, cos, tanh) and conversions F2F / F2I / I2F / FRND
    fp32    FADD FMUL FFMA FMNMX FSEL FSETP FSET FCHK and the packed half ops (HADD2 HMUL2 HFMA2
            HMNMX2 HSETP2), F2FP (pack two fp32 into 16-bit pairs)
    int     IMAD IADD3 LOP3 SHF ISETP LEA PRMT SEL IMNMX IABS POPC FLO BREV BMSK SGXT I2IP VIADD ...
            and their uniform-datapath forms (UIADD3, ULOP3, ...: they issue like any other)
    memory  LDG STG LDS STS LDSM STSM LDGSTS LD ST ATOM(S) RED LDL STL UTMALDG UBLKCP ...
    other   MOV, S2R, BAR, BRA, DEPBAR, WARPGROUP, NOP, SHFL, VOTE, ... (issue slots only)

Limits: the classification is by opcode name, not by the hardware's exact dispatch port (IMAD
runs on the FMA pipe on some archs; the uniform datapath has its own pipe); the loop finder
sees only loops closed by a backward branch (fully unrolled loops are straight-line code).
"""
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

_BIN_SUBDIR = os.path.join("backends", "nvidia", "bin")

_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_ARCH = re.compile(r"code for (sm_\w+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^(@!?U?P[T0-9]+)\s+")
_TARGET = re.compile(r"0x([0-9a-f]+)")
_SHAPE3 = re.compile(r"\.(\d+)x(\d+)x(\d+)")

TENSOR = ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "QGMMA", "BGMMA", "UTCHMMA", "UTCQMMA")
MUFU = ("MUFU", "F2F", "F2I", "I2F", "FRND", "I2FP", "F2IP")
FP32 = ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "FSWZADD", "HADD2", "HMUL2",
        "HFMA2", "HMNMX2", "HSETP2", "HSET2", "F2FP", "FADD2", "FMUL2", "FFMA2")
INT = ("IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "LEA", "PRMT", "SEL",
       "IMNMX", "IABS", "POPC", "FLO", "BREV", "BMSK", "SGXT", "I2IP", "VIADD", "VIMNMX", "IDP", "IMUL",
       "P2R", "R2P", "PLOP3", "ULOP3", "UIADD3", "UIMAD", "USHF", "ULEA", "UISETP", "USEL", "UPRMT",
       "UFLO", "UPOPC", "UBREV", "USGXT", "UBMSK", "UP2UR", "UPLOP3", "UIABS", "UIMNMX", "UR2UP",
       "ULOP", "USHL", "USHR")
MEMORY = ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LD", "ST", "ATOM", "ATOMS", "ATOMG",
          "RED", "REDG", "LDL", "STL", "LDC", "ULDC", "UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "LDGDEPBAR",
          "CCTL", "UTMACCTL", "UBLKRED", "UTMAREDG")
PIPES = ("tensor", "mufu", "fp32", "int", "memory", "other")
# The memory ops that move data through the L1 / shared-memory data path (constant loads and
# bulk / TMA copies do not).
_LSU_DATA = ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LD", "ST", "ATOM", "ATOMS", "ATOMG",
             "RED", "REDG", "LDL", "STL")


@dataclass
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. "HMMA.16816.F32"
    operands: str
    predicated: bool = False

    @property
    def base(self):
        return self.opcode.split(".", 1)[0]


@dataclass
class Function:
    name: str
    arch: str
    instrs: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------
@functools.cache
def tool(name):
    """Path to cuobjdump / nvdisasm: Triton's bundled copy first, then PATH."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), _BIN_SUBDIR, name)
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (neither bundled with Triton nor on PATH)")
    return found


def _run(args, timeout=600):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 and not proc.stdout:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def disassemble_cubin(cubin):
    """SASS listing (cuobjdump -sass) of a cubin given as bytes."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _run([tool("cuobjdump"), "-sass", f.name])


def disassemble_binary(path, arch=None, function=None):
    """SASS listing of the cubins embedded in an executable / shared library, optionally only
    one arch (``sm_90``) and one (mangled) function."""
    args = [tool("cuobjdump"), "-sass"]
    if arch:
        args += ["-arch", arch]
    if function:
        args += ["-fun", function]
    return _run(args + [path])


def resource_usage(path, arch=None):
    """{mangled function: dict(REG=, STACK=, SHARED=, LOCAL=)} from cuobjdump -res-usage, per
    function (the first arch seen when several are embedded and arch is None)."""
    args = [tool("cuobjdump"), "-res-usage"] + (["-arch", arch] if arch else []) + [path]
    return parse_resource_usage(_run(args))


def parse_resource_usage(text):
    usage, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+?):\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))
            usage.setdefault(current, {k: int(v) for k, v in fields.items()})
            current = None
    return usage


# ------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------
def parse_sass(text):
    """[Function] in listing order (cuobjdump -sass format: ``/*0100*/  @P0 OPC.MOD a, b ;``)."""
    functions, current, arch = [], None, None
    for line in text.splitlines():
        m = _ARCH.search(line)
        if m and "Function" not in line:
            arch = m.group(1)
            continue
        m = _FUNC.match(line)
        if m:
            current = Function(m.group(1), arch)
            functions.append(current)
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2).strip()
        predicated = False
        p = _PRED.match(body)
        if p:
            predicated = p.group(1) not in ("@PT", "@UPT")
            body = body[p.end():]
        opcode, _, operands = body.partition(" ")
        current.instrs.append(Instr(int(m.group(1), 16), opcode, operands.strip(), predicated))
    return functions


def find_loops(instrs):
    """[(first index, last index)] of every loop: the range from a backward branch's target to
    the branch itself, sorted by start."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = set()
    for i, ins in enumerate(instrs):
        if ins.base not in ("BRA", "JMP") or "0x" not in ins.operands:
            continue
        target = int(_TARGET.search(ins.operands).group(1), 16)
        if target <= ins.addr and target in index:
            loops.add((index[target], i))
    return sorted(loops)


def innermost_loops(loops):
    """The loops that contain no other loop."""
    return [a for a in loops
            if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]


def classify(opcode):
    """The pipe of an opcode (see the module docstring)."""
    base = opcode.split(".", 1)[0]
    if base in TENSOR:
        return "tensor"
    if base in MUFU:
        return "mufu"
    if base in FP32:
        return "fp32"
    if base in INT:
        return "int"
    if base in MEMORY:
        return "memory"
    return "other"


# Per-warp mma.sync shapes by their SASS spelling: HMMA.16816 is m16n8k16.
_MMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "1684": (16, 8, 4), "16832": (16, 8, 32),
               "16864": (16, 8, 64), "8816": (8, 8, 16), "8832": (8, 8, 32), "884": (8, 8, 4)}


def mma_flops(ins):
    """Tensor FLOPs one warp's execution of an MMA instruction contributes (0 for non-MMA).

    HMMA.16816 is m16n8k16 per warp (2*16*8*16 FLOPs), HMMA.1688 m16n8k8, IMMA.16832 m16n8k32
    (counted as ops). HGMMA.64xNxK is one warpgroup-wide m64nNkK issued by each of its 4 warps:
    a quarter of 2*64*N*K per warp.
    """
    base = ins.base
    if base not in TENSOR:
        return 0
    m = _SHAPE3.search(ins.opcode)
    if m:  # HGMMA / IGMMA / QGMMA: warpgroup shape MxNxK
        mm, nn, kk = (int(g) for g in m.groups())
        return 2 * mm * nn * kk // 4
    for part in ins.opcode.split(".")[1:]:
        if part in _MMA_SHAPES:
            mm, nn, kk = _MMA_SHAPES[part]
            return 2 * mm * nn * kk
    raise ValueError(f"unknown MMA shape: {ins.opcode}")


def lsu_bytes_per_warp(ins):
    """Bytes one warp's memory instruction moves through the L1 / shared-memory data path."""
    if ins.base not in _LSU_DATA:
        return 0
    op = ins.opcode
    if ins.base in ("LDSM", "STSM"):
        # LDSM.16.M88.4: four 8x8 16-bit matrices (128 B each) per warp; .2, .1 (or .x4 ...)
        m = re.search(r"\.x?([124])(?:\.|$)", "." + op.split(".", 1)[1] + "." if "." in op else "")
        return 128 * (int(m.group(1)) if m else 1)
    for suffix, width in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return 32 * width
    return 32 * 4


@dataclass
class Mix:
    """The work of a code range, per warp: instruction counts per pipe and opcode."""
    instructions: int
    per_pipe: dict
    opcodes: dict
    mma_flops: int  # tensor FLOPs per warp
    mma_count: int
    lsu_bytes: int  # L1/smem data-path bytes per warp
    lsu_instructions: int

    def as_dict(self):
        return dict(instructions=self.instructions, per_pipe=self.per_pipe, mma_flops=self.mma_flops,
                    mma_count=self.mma_count, lsu_bytes=self.lsu_bytes,
                    lsu_instructions=self.lsu_instructions,
                    top_opcodes=dict(Counter(self.opcodes).most_common(12)))


def mix(instrs):
    per_pipe = Counter({p: 0 for p in PIPES})
    opcodes = Counter()
    flops = mmas = lsu = lsu_n = 0
    for ins in instrs:
        if ins.base == "NOP":
            continue
        pipe = classify(ins.opcode)
        per_pipe[pipe] += 1
        opcodes[ins.base] += 1
        if pipe == "tensor":
            flops += mma_flops(ins)
            mmas += 1
        b = lsu_bytes_per_warp(ins)
        if b:
            lsu += b
            lsu_n += 1
    return Mix(sum(per_pipe.values()), dict(per_pipe), dict(opcodes), flops, mmas, lsu, lsu_n)


@dataclass
class LoopReport:
    main: Mix  # the main loop: most MMA FLOPs, then fewest instructions
    main_range: tuple
    outside: Mix  # everything outside every loop (run once per CTA, roughly)
    loops: list  # [(range, Mix)] of every innermost loop
    total: Mix


def analyse(function):
    """Loops and mixes of one function; ``main`` is the innermost loop with the most tensor
    FLOPs (ties: the fewest instructions, e.g. the unmasked copy of a loop the source has twice),
    or, when no loop has MMAs, the largest innermost loop (None when there is no loop)."""
    instrs = function.instrs
    loops = find_loops(instrs)
    inner = innermost_loops(loops)
    mixes = [(r, mix(instrs[r[0]:r[1] + 1])) for r in inner]
    main_range, main = None, None
    if mixes:
        if any(m.mma_flops for _, m in mixes):
            main_range, main = max(mixes, key=lambda rm: (rm[1].mma_flops, -rm[1].instructions))
        else:
            main_range, main = max(mixes, key=lambda rm: rm[1].instructions)
    in_loop = set()
    for a, b in loops:
        in_loop.update(range(a, b + 1))
    outside = mix([ins for i, ins in enumerate(instrs) if i not in in_loop])
    return LoopReport(main, main_range, outside, mixes, mix(instrs))


# ------------------------------------------------------------------------------------------
# Memory-bound kernels: the loads each thread has in flight
# ------------------------------------------------------------------------------------------
_REG = re.compile(r"(?<![\w.])R(\d+)(\.64|\.128)?")
# Control flow ends a straight run of loads: what follows may be on a path not taken.
_CONTROL = ("BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BREAK", "BSYNC", "KILL")


def access_width(ins):
    """Bytes one thread's memory instruction moves (16 for .128, 8 for .64, 2 / 1 for 16 / 8-bit,
    else 4)."""
    for suffix, width in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in ins.opcode:
            return width
    return 4


def registers(ins):
    """Every general register an instruction names (read or written); a ``R4.64`` address names
    R4 and R5, and the data register of a 64 / 128-bit memory op the 2 / 4 that follow it."""
    regs = set()
    names = list(_REG.finditer(ins.operands))
    for m in names:
        r = int(m.group(1))
        regs.update(range(r, r + (2 if m.group(2) == ".64" else 4 if m.group(2) == ".128" else 1)))
    if classify(ins.opcode) == "memory" and names:
        # the data register: the destination of a load (first operand), the value of a store (last)
        m = names[0] if ins.base.startswith("LD") else names[-1]
        r = int(m.group(1))
        regs.update(range(r, r + max(1, access_width(ins) // 4)))
    return regs


def load_destinations(ins):
    """The registers a global load writes: the destination and the ones after it for a vector
    (R4 of LDG.E.128 is R4..R7, of LDG.E.64 R4..R5)."""
    m = _REG.search(ins.operands)
    if not m:
        return set()
    r = int(m.group(1))
    return set(range(r, r + max(1, access_width(ins) // 4)))


@dataclass
class MemoryMain:
    """What the memory-bound model reads from a kernel's SASS (see :func:`memory_main`)."""
    main_range: tuple  # (first, last) index of the main loop, or the whole body when loop-free
    main: Mix
    data_width: int  # bytes per thread of one data load (the widest LDG); 0 when none
    loads_in_flight: int  # data LDGs issued back to back before the first use (>= 1)
    first_batch: tuple  # their indices


def memory_main(function, width=None):
    """The main loop of a memory-bound kernel and the data loads each thread has in flight.

    * The data loads are the global loads (LDG) of ``width`` bytes per thread, the access width
      of the launch (e.g. the 16-byte packs of a row; default: the widest LDG); loads of another
      width (per-row scalars such as mean / rstd, row indices) are not data. Limit: a scalar of
      the data's width (fp32 mean / rstd next to unvectorized fp32 data) counts as data.
    * The main loop is the loop that holds the most data loads, counting each in its innermost
      enclosing loop (see :func:`find_loops`; the whole function body for a load in no loop, so
      a loop-free kernel's main loop is its body); ties: the earliest. Not the function's
      innermost loop: a LayerNorm register kernel's innermost loop is the shared-memory fold of
      per-warp partial sums (row_sum), with no global load; its data loads sit in the row loop.
      And not a remainder loop: an unrolled loop's remainder copy holds fewer loads. Ranges that
      cross another loop's boundary are ignored when they close later (of two crossing ranges):
      they are the slow paths of warp-divergent shuffles (BRA.DIV to code after the body that
      branches back into it), not source loops.
    * Loads in flight per thread: from the main loop's first data load on, the data loads issued back to
      back before the first instruction that names (reads, or overwrites) a register one of them
      writes (vector destinations included: R4 of LDG.E.128 is R4..R7; predicates ignored), or
      before the first branch (loads past it are on a path that may not be taken, e.g. the
      LayerNorm forward's runtime ``if (residual)`` loads: a conservative count for that path).
      This is the memory-level parallelism of the first batch; assumed: the loads of a batch are
      in flight together, later batches do not overlap it.
    """
    instrs = function.instrs
    ldgs = [i for i, ins in enumerate(instrs) if ins.base == "LDG"]
    if not ldgs:
        return MemoryMain((0, len(instrs) - 1), mix(instrs), 0, 1, ())
    width = width or max(access_width(instrs[i]) for i in ldgs)
    data = [i for i in ldgs if access_width(instrs[i]) == width]
    if not data:  # no load of that width: the widest
        return memory_main(function, max(access_width(instrs[i]) for i in ldgs))
    loops = find_loops(instrs)
    # A range that crosses another loop's boundary (neither nested in it nor disjoint) is not a
    # source loop: it is the slow path of a warp-divergent shuffle (BRA.DIV to code after the
    # body that branches back into it); of two crossing ranges, that is the one closed later.
    loops = [a for a in loops if not any(b[0] < a[0] <= b[1] < a[1] for b in loops)]
    body = (0, len(instrs) - 1)
    count = Counter()
    for i in data:  # each data load's innermost loop (the body when in none)
        holding = [r for r in loops if r[0] <= i <= r[1]]
        count[min(holding, key=lambda r: r[1] - r[0]) if holding else body] += 1
    # the most data loads; ties: the earliest
    lo, hi = min(count, key=lambda r: (-count[r], r[0]))
    first = next(i for i in data if lo <= i <= hi)
    batch, written = [], set()
    for i in range(first, hi + 1):
        ins = instrs[i]
        if ins.base == "LDG" and access_width(ins) == width:
            if registers(ins) & written:  # its address (or destination) waits on the batch
                break
            batch.append(i)
            written |= load_destinations(ins)
            continue
        if ins.base in _CONTROL or registers(ins) & written:
            break
    return MemoryMain((lo, hi), mix(instrs[lo:hi + 1]), width, max(1, len(batch)), tuple(batch))
