"""Model-parallel PyTorch baselines, shared by benchmarks/bench_model_parallel.py and its tests.

Two ways to spread an encoder's layers over devices, each usable with a torch
``nn.TransformerEncoder`` and with a ``bertkern.Encoder`` (same weights via ``from_torch``):

  LayerSplitEncoder   the classic recipe: consecutive layers in ``len(devices)`` contiguous
                      stages, stage i on devices[i], activations (and the key padding mask) moved
                      from stage to stage in one process. No overlap: one device works at a time.
  PipelineRunner      micro-batched pipelining with ``torch.distributed.pipelining`` (GPipe):
                      one process per stage (gloo on CPU, nccl when each rank has a GPU), each
                      stage a slice of the layers wrapped in ``PipelineStage`` by hand (no
                      tracing: ``pipeline`` / ``SplitPoint`` tracing trips on custom ops and
                      masks), driven by ``ScheduleGPipe``. The workers stay up between steps; the
                      parent sends "step" and times it, so pytest-benchmark and the interleaved
                      timer of benchmarks/_timing.py time real pipeline steps.

How the key padding mask (B, S), True = padding, travels:

  * LayerSplitEncoder, torch: the padded activations (B, S, E) and the mask are moved to each
    stage's device; each stage is an ``nn.TransformerEncoder`` over its layers.
  * LayerSplitEncoder, bertkern: padding is removed once on devices[0] (``bertkern.ops.padding.
    Packing``: gather the T real tokens), the packed tokens (T, E) and cu_seqlens go
    from stage to stage through ``Encoder.forward_packed``, padding is put back once on the last
    device. Only real tokens cross devices.
  * PipelineRunner: the mask is a keyword argument of ``schedule.step(...)`` on every rank. The
    schedule splits it into micro-batches along dim 0 exactly as it splits the activations
    (``TensorChunkSpec(0)``), and ``PipelineStage.forward_one_chunk`` passes micro-batch i's
    slice to every stage's forward as ``src_key_padding_mask`` (torch 2.14:
    "kwargs can be passed to all stages via respective step calls"). It is data every rank's
    loader has, like the labels, so it is not sent between stages. Between stages only the padded
    activations (mb, S, E) travel: ``PipelineStage`` preallocates its receive buffers from the
    first micro-batch's shapes, so a packed (T, E) whose T varies per micro-batch cannot be sent.
    A bertkern stage is therefore a ``bertkern.Encoder`` of its layers that removes and restores
    padding itself (one gather and one scatter per stage); the layers still run on real tokens.

The loss used for training steps is ``token_loss``: sum(output * target), where the target is
random at real tokens, scaled by 1 / (number of real tokens), and zero at padding: a token-level
loss whose gradient is dense on real tokens and zero at padding for both stacks (torch's training
path leaves non-zero values at padded positions; they must not count).
"""
from __future__ import annotations

import copy
import math
import os
import queue
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "EncoderConfig", "make_torch_encoder", "make_encoder", "make_batch", "token_loss", "split_bounds",
    "encoder_slice", "devices_for_split", "LayerSplitEncoder", "saved_activation_bytes", "cuda_peak_bytes",
    "PipelineRunner", "IMPLS", "MODES",
]

IMPLS = ("torch", "bertkern")
MODES = ("train", "inference")


# ---- workload ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderConfig:
    """An encoder stack and one padded batch (lengths uniform in [seqlen // 8, seqlen], one
    sequence full length, batch_first). ``dtype`` is the weights' and activations' dtype."""
    d_model: int = 256
    nhead: int = 4
    dim_feedforward: int = 1024
    num_layers: int = 4
    dropout: float = 0.1
    batch: int = 16
    seqlen: int = 128
    dtype: torch.dtype = torch.float32
    seed: int = 0


def make_torch_encoder(cfg: EncoderConfig, device="cpu") -> nn.TransformerEncoder:
    """An ``nn.TransformerEncoder`` (batch_first, post-LN, relu) with deterministic weights that
    differ from layer to layer (torch's constructor copies one layer), drawn from a generator
    seeded by ``cfg.seed``: every process builds the same model, the global RNG is untouched."""
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.nhead, cfg.dim_feedforward, cfg.dropout,
                                       batch_first=True, device="meta")
    encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=True)
    encoder.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if p.dim() >= 2:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return encoder.to(device=device, dtype=cfg.dtype)


def make_encoder(impl: str, cfg: EncoderConfig, device="cpu") -> nn.Module:
    """``make_torch_encoder``, or for impl "bertkern" a ``bertkern.Encoder`` with its weights."""
    torch_encoder = make_torch_encoder(cfg, device)
    if impl == "torch":
        return torch_encoder
    if impl == "bertkern":
        import bertkern

        return bertkern.Encoder.from_torch(torch_encoder)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def make_batch(cfg: EncoderConfig, device="cpu"):
    """(x (B, S, E) cfg.dtype, key_padding_mask (B, S) bool True = padding, target (B, S, E)
    fp32 for ``token_loss``, real token count)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    lengths = torch.randint(max(1, cfg.seqlen // 8), cfg.seqlen + 1, (cfg.batch,), generator=gen)
    lengths[0] = cfg.seqlen  # a batch is padded to its longest sequence
    mask = torch.arange(cfg.seqlen)[None, :] >= lengths[:, None]
    x = torch.randn(cfg.batch, cfg.seqlen, cfg.d_model, generator=gen)
    real_tokens = int(lengths.sum())
    target = torch.randn(cfg.batch, cfg.seqlen, cfg.d_model, generator=gen)
    target = target.masked_fill(mask[..., None], 0.0) / max(real_tokens, 1)
    return x.to(device=device, dtype=cfg.dtype), mask.to(device), target.to(device), real_tokens


def token_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum(output * target) in fp32; ``target`` is zero at padding (see the module docstring)."""
    return (output.float() * target.float()).sum()


# ---- the layer split ---------------------------------------------------------------------------

def split_bounds(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """[start, stop) of each stage: contiguous, sizes differ by at most one, early stages larger."""
    if num_stages < 1 or num_layers < num_stages:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} non-empty stages")
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for i in range(num_stages):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def encoder_slice(encoder: nn.Module, start: int, stop: int, keep_norm: bool) -> nn.Module:
    """Layers [start, stop) of ``encoder`` as a module of the encoder's own class (so torch's
    stages keep its mask handling and nested-tensor fast path, bertkern's its packed path).
    Shares the layers' parameters; the final norm only where ``keep_norm`` (the last stage)."""
    stage = copy.copy(encoder)  # shallow: same settings; a fresh _modules dict below
    stage.__dict__["_modules"] = dict(encoder._modules)
    stage.layers = nn.ModuleList(list(encoder.layers)[start:stop])
    stage.norm = encoder.norm if keep_norm else None
    stage.num_layers = stop - start
    return stage


def devices_for_split(n: int) -> list[torch.device]:
    """n CUDA devices when the machine has that many; otherwise the same split on the single
    device there is (cuda:0 or the CPU) repeated n times. Benchmarks record this list."""
    if n < 1:
        raise ValueError(f"devices_for_split: n must be >= 1, got {n}")
    if torch.cuda.is_available():
        if torch.cuda.device_count() >= n:
            return [torch.device("cuda", i) for i in range(n)]
        return [torch.device("cuda", 0)] * n
    return [torch.device("cpu")] * n


class LayerSplitEncoder(nn.Module):
    """The classic model-parallel recipe: ``encoder``'s layers in len(devices) contiguous stages,
    stage i moved to devices[i] (the encoder's parameters move with it; the final norm goes with
    the last stage). ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)`` as the
    wrapped encoder's; the output is on devices[-1].

    For a bertkern.Encoder with a bool (or no) key padding mask and no attention ``mask``, padding
    is removed once at entry and restored once at exit, and the packed real tokens (T, E) with
    cu_seqlens travel between stages (``Encoder.forward_packed``). Otherwise each stage is called
    as an encoder on the padded batch: a bertkern stage then unpads and pads by itself, which is
    correct (it outputs zeros at padding, and padding is masked in the next stage) but pays a
    gather and a scatter per stage.
    """

    def __init__(self, encoder: nn.Module, devices: list) -> None:
        super().__init__()
        import bertkern

        if not isinstance(encoder, (nn.TransformerEncoder, bertkern.Encoder)):
            raise TypeError("LayerSplitEncoder: encoder must be an nn.TransformerEncoder or a bertkern.Encoder, "
                            f"got {type(encoder).__name__}")
        self.devices = [torch.device(d) for d in devices]
        if not self.devices:
            raise ValueError("LayerSplitEncoder: devices must be a non-empty list")
        bounds = split_bounds(len(encoder.layers), len(self.devices))
        last = len(bounds) - 1
        self.bounds = bounds
        self.stages = nn.ModuleList(
            encoder_slice(encoder, a, b, keep_norm=(i == last)).to(dev)
            for i, ((a, b), dev) in enumerate(zip(bounds, self.devices)))
        self.packed = isinstance(encoder, bertkern.Encoder)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        kpm = src_key_padding_mask
        if (self.packed and mask is None and src.dim() == 3
                and (kpm is None or (kpm.dtype == torch.bool and tuple(kpm.shape) == self._batch_seq(src)))):
            return self._forward_packed(src, kpm, bool(is_causal))
        for stage, dev in zip(self.stages, self.devices):
            src = stage(src.to(dev), mask=None if mask is None else mask.to(dev),
                        src_key_padding_mask=None if kpm is None else kpm.to(dev), is_causal=is_causal)
        return src

    def _batch_seq(self, src):
        batch_first = self.stages[0]._batch_first
        return (src.shape[0], src.shape[1]) if batch_first else (src.shape[1], src.shape[0])

    def _forward_packed(self, src, kpm, causal):
        from bertkern.ops.padding import Packing

        dev0 = self.devices[0]
        src = src.to(dev0)
        batch, seqlen = self._batch_seq(src)
        batch_first = self.stages[0]._batch_first
        packing = (Packing.full(batch, seqlen, dev0, batch_first) if kpm is None
                   else Packing.from_mask(kpm.to(dev0), batch_first))
        x, cu_seqlens = packing.pack(src), packing.cu_seqlens
        for stage, dev in zip(self.stages, self.devices):
            x, cu_seqlens = x.to(dev), cu_seqlens.to(dev)
            x = stage.forward_packed(x, cu_seqlens, packing.max_seqlen, causal=causal)
        return packing.to(self.devices[-1]).unpack(x)


# ---- memory ------------------------------------------------------------------------------------

def saved_activation_bytes(fn, params=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs, parameters
    excluded: the activation memory a training step holds at the end of its forward. A device-
    independent stand-in for peak memory on CPU, where the allocator keeps no peak statistics."""
    skip = {(p.device, p.untyped_storage().data_ptr()) for p in params}
    seen: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in skip:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(seen.values()))


def cuda_peak_bytes(fn, devices) -> list[int]:
    """torch.cuda.max_memory_allocated of each CUDA device in ``devices`` over one ``fn()``."""
    cuda = sorted({d.index or 0 for d in map(torch.device, devices) if d.type == "cuda"})
    for i in cuda:
        torch.cuda.synchronize(i)
        torch.cuda.reset_peak_memory_stats(i)
    fn()
    for i in cuda:
        torch.cuda.synchronize(i)
    return [int(torch.cuda.max_memory_allocated(i)) for i in cuda]


# ---- GPipe pipelining across processes ---------------------------------------------------------

@dataclass(frozen=True)
class _PipelineSpec:
    cfg: EncoderConfig
    impls: tuple
    modes: tuple
    world_size: int
    n_microbatches: int
    device_type: str
    threads_per_rank: int
    init_file: str


def _pipeline_worker(rank, spec: _PipelineSpec, commands, replies):
    """One pipeline rank: builds its stage of every impl once, then serves the parent's commands
    (step / memory / collect / close) until told to close."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")  # torch's eval fast path
    torch.set_num_threads(spec.threads_per_rank)
    cfg, ws = spec.cfg, spec.world_size
    cuda = spec.device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    try:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{spec.init_file}",
                                rank=rank, world_size=ws, **({"device_id": device} if cuda else {}))
        first, last = rank == 0, rank == ws - 1
        start, stop = split_bounds(cfg.num_layers, ws)[rank]
        x, mask, target, _ = make_batch(cfg, device)
        args = (x,) if first else ()
        target = target if last else None

        runs = {}
        for impl in spec.impls:
            encoder = make_encoder(impl, cfg)
            names = {id(p): n for n, p in encoder.named_parameters()}
            module = encoder_slice(encoder, start, stop, keep_norm=last).to(device)
            param_names = [names[id(p)] for p in module.parameters()]  # global names, e.g. layers.3.*
            for mode in spec.modes:
                stage = PipelineStage(module, rank, ws, device)
                # scale_grads=False: token_loss of a micro-batch is already its share of the batch
                # loss, so the accumulated gradients are the whole batch's.
                schedule = ScheduleGPipe(stage, spec.n_microbatches,
                                         loss_fn=token_loss if mode == "train" else None, scale_grads=False)
                runs[impl, mode] = (module, schedule, param_names)

        def step(impl, mode, outputs=False):
            module, schedule, _ = runs[impl, mode]
            train = mode == "train"
            module.train(train)
            losses = [] if (train and last) else None
            if train:
                for p in module.parameters():
                    p.grad = None
                out = schedule.step(*args, target=target, losses=losses, return_outputs=outputs,
                                    src_key_padding_mask=mask)
            else:
                with torch.no_grad():
                    out = schedule.step(*args, return_outputs=outputs, src_key_padding_mask=mask)
            if cuda:
                torch.cuda.synchronize(device)
            return out, losses

        replies.put((rank, "ok", {"device": str(device), "layers": [start, stop],
                                  "threads": torch.get_num_threads()}))
        while True:
            command = commands.get()
            kind = command[0]
            if kind == "close":
                break
            if kind == "step":
                t0 = time.perf_counter()
                step(*command[1:])
                result = time.perf_counter() - t0
            elif kind == "memory":
                impl, mode = command[1:]
                module = runs[impl, mode][0]
                result = {"saved_activation_bytes": None, "cuda_peak_bytes": None}
                if mode == "train":
                    result["saved_activation_bytes"] = saved_activation_bytes(
                        lambda: step(impl, mode), list(module.parameters()))
                if cuda:
                    result["cuda_peak_bytes"] = cuda_peak_bytes(lambda: step(impl, mode), [device])[0]
            elif kind == "collect":
                impl = command[1]
                result = {}
                if "train" in spec.modes:
                    out, losses = step(impl, "train", outputs=True)
                    module, _, names = runs[impl, "train"]
                    result["grads"] = {n: p.grad.detach().float().cpu().clone()
                                       for n, p in zip(names, module.parameters()) if p.grad is not None}
                    if last:
                        result["train_output"] = out.detach().float().cpu().clone()
                        result["loss"] = float(sum(loss.item() for loss in losses))
                if "inference" in spec.modes:
                    out, _ = step(impl, "inference", outputs=True)
                    if last:
                        result["inference_output"] = out.float().cpu().clone()
            else:
                raise ValueError(f"unknown command {command!r}")
            replies.put((rank, "ok", result))
    except BaseException:
        replies.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class PipelineRunner:
    """GPipe over ``world_size`` processes, one stage (a contiguous slice of the layers) per
    rank, for each impl in ``impls`` ("torch": nn.TransformerEncoder, "bertkern":
    bertkern.Encoder.from_torch of it) and each mode ("train": forward + backward of
    ``token_loss``, gradients accumulated over micro-batches; "inference": eval() + no_grad,
    forward only), all built once on ``make_batch(cfg)``.

    CPU: gloo, ``threads_per_rank`` intra-op threads per rank (default: this process's cores
    split evenly, so 1 per rank on a 2-core machine).
    CUDA (``device_type="cuda"``): nccl, rank r on cuda:r; needs world_size GPUs.
    Ranks rendezvous through a file in a temporary folder (no port to clash).

    ``step(impl, mode)`` runs one schedule step on every rank and returns each rank's own time
    for it (seconds, from receiving the command to the end of the step; CUDA synchronized); the
    caller's clock around ``step`` adds only the command round trip. Workers that stay up, rather
    than one launch that times a fixed loop, let the caller time real steps with pytest-benchmark
    and interleave the stacks step by step, so that machine noise hits both alike.
    ``median_step_seconds(impl, mode)``, ``memory(impl, mode)`` (per rank: saved activation
    bytes in train mode, CUDA peak), ``collect(impl)`` (loss, output, gradients by global
    parameter name, for tests) and ``info`` (per rank: device, layers, threads). Use as a context manager, or call ``close()``.
    """

    def __init__(self, cfg: EncoderConfig, impls=IMPLS, modes=MODES, world_size: int = 2,
                 n_microbatches: int = 4, device_type: str = "cpu", threads_per_rank: int | None = None,
                 timeout_s: float = 600.0) -> None:
        if cfg.batch % n_microbatches:
            raise ValueError(f"batch ({cfg.batch}) must be a multiple of n_microbatches ({n_microbatches})")
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"PipelineRunner: {world_size} ranks on CUDA need {world_size} GPUs, "
                             f"found {torch.cuda.device_count()}")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
        if threads_per_rank is None:
            threads_per_rank = max(1, len(os.sched_getaffinity(0)) // world_size)
        self.world_size, self.timeout_s = world_size, timeout_s
        self._tmp = tempfile.mkdtemp(prefix="bertkern_pipeline_")
        self.spec = _PipelineSpec(cfg, tuple(impls), tuple(modes), world_size, n_microbatches, device_type,
                                  threads_per_rank, os.path.join(self._tmp, "init"))
        ctx = torch.multiprocessing.get_context("spawn")
        self._commands = [ctx.Queue() for _ in range(world_size)]
        self._replies = ctx.Queue()
        self._procs = [ctx.Process(target=_pipeline_worker, args=(r, self.spec, self._commands[r], self._replies),
                                   daemon=True) for r in range(world_size)]
        try:
            for p in self._procs:
                p.start()
            self.info = self._gather("start")
        except BaseException:
            self.close()
            raise

    def _gather(self, what):
        results = [None] * self.world_size
        pending = set(range(self.world_size))
        deadline = time.monotonic() + self.timeout_s
        while pending:
            try:
                rank, status, payload = self._replies.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r in pending if not self._procs[r].is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = f"rank(s) {dead} exited" if dead else f"no reply within {self.timeout_s:.0f} s"
                    raise RuntimeError(f"PipelineRunner {what}: {why}")
                continue
            if status == "error":
                self.close()
                raise RuntimeError(f"PipelineRunner {what}: rank {rank} failed:\n{payload}")
            results[rank] = payload
            pending.discard(rank)
        return results

    def _run(self, *command):
        for q in self._commands:
            q.put(command)
        return self._gather(" ".join(map(str, command)))

    def step(self, impl: str, mode: str) -> list[float]:
        return self._run("step", impl, mode)

    def median_step_seconds(self, impl: str, mode: str, iters: int = 5, warmup: int = 1) -> float:
        """Median over ``iters`` steps (after ``warmup``) of the slowest rank's step time."""
        for _ in range(warmup):
            self.step(impl, mode)
        return statistics.median(max(self.step(impl, mode)) for _ in range(iters))

    def memory(self, impl: str, mode: str) -> list[dict]:
        return self._run("memory", impl, mode)

    def collect(self, impl: str) -> dict:
        """One train step and one inference step of ``impl``: {"loss", "train_output",
        "inference_output" (from the last rank), "grads" (all ranks, by global parameter name)}."""
        per_rank = self._run("collect", impl)
        merged = dict(per_rank[-1])
        merged["grads"] = {k: v for r in per_rank for k, v in r.get("grads", {}).items()}
        return merged

    def close(self) -> None:
        for p, q in zip(self._procs, self._commands):
            if p.is_alive():
                try:
                    q.put(("close",))
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            if p.pid is not None:
                p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
