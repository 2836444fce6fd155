"""Model-parallel benchmarks: bertkern.Encoder against PyTorch's model-parallel recipes.

Run with ``pytest benchmarks --benchmark-only``. Helpers: benchmarks/model_parallel.py (tested
in tests/test_model_parallel.py). Workload: ``make_batch``, lengths uniform in [S/8, S] with one
full-length sequence (~40% padding); the same weights in both stacks (``Encoder.from_torch``);
dropout 0.1 in training as in a real run. Modes: ``train`` = forward + backward of a token-level
loss (``token_loss``: zero weight at padding), gradients set to None before each step, no
optimizer; ``inference`` = eval() + no_grad forward (torch then takes its nested-tensor fast path).

(a) layer split, group "model_parallel layer_split ...": ``LayerSplitEncoder`` over
    ``devices_for_split(2)``: consecutive layers, stage i on devices[i], activations moved
    between stages, in one process. impl "torch_layer_split" (nn.TransformerEncoder stages) and
    "bertkern_layer_split" (padding removed once; packed real tokens + cu_seqlens cross the stage
    boundary). On a machine with fewer than 2 GPUs it is the same split on one device, and
    ``devices`` in extra_info says so.
(b) pipelining, group "model_parallel pipeline ...": GPipe (``torch.distributed.pipelining``,
    ``ScheduleGPipe``) with 2 stages in 2 processes, 4 micro-batches, the key padding mask
    passed to every stage per micro-batch; gloo on CPU (1 thread per rank here: 2 ranks on 2
    cores), nccl with one GPU per rank (needs 2 GPUs). impl "pipeline_torch" / "pipeline_bertkern".
    The workers stay up; each pytest-benchmark round sends one step command, so the row's time is
    one real pipeline step plus the command round trip (well under a millisecond).
    ``worker_step_seconds`` is the step time measured inside the workers (per round, the slowest
    rank's time from receiving the command to the end of its part of the step; median over the
    rounds), and ``tokens_per_s`` uses it.

extra_info: impl, mode, device, devices, workload, batch, seqlen, d_model, nhead,
dim_feedforward, layers, dropout, dtype, padding_fraction, real_tokens, seconds, tokens_per_s,
cpu_threads; every row's own interleaved rounds (median_s, iqr_s, min_s, rounds, round_seconds:
7 rounds of both implementations at the case's first row; for (b) the worker-measured step
times) and ``interleaved_seconds`` (both medians); in the bertkern rows ``speedup_vs_<baseline>``
(baseline median / bertkern median) and ``speedup_vs_<baseline>_ci95`` (paired bootstrap). Memory: on CUDA ``peak_memory_bytes`` (torch.cuda.max_memory_allocated
of one step, the largest over the devices / ranks, with the per-device list); on CPU, where the
allocator keeps no peak, ``saved_activation_bytes`` (train mode: the distinct storages autograd
holds for backward, parameters excluded, summed over devices / ranks; GPipe holds every
micro-batch's at once). CPU cases are small but real; CUDA cases run BERT-base shapes (768 / 12 /
3072, 12 layers, batch 32, S 512, bf16 weights) and skip cleanly without (enough) GPUs. No
device is queried at import time.
"""
import statistics

import pytest
import torch

from _timing import interleaved_rounds, ratio_info, summary  # benchmarks/_timing.py (on sys.path)
from bertkern.bench.stats import median
from model_parallel import (
    EncoderConfig, LayerSplitEncoder, PipelineRunner, cuda_peak_bytes, devices_for_split, make_batch,
    make_encoder, saved_activation_bytes, token_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")

CPU_CFG = EncoderConfig(d_model=256, nhead=4, dim_feedforward=1024, num_layers=4, dropout=0.1,
                        batch=16, seqlen=128, dtype=torch.float32)
CUDA_CFG = EncoderConfig(d_model=768, nhead=12, dim_feedforward=3072, num_layers=12, dropout=0.1,
                         batch=32, seqlen=512, dtype=torch.bfloat16)
CONFIGS = {"cpu": CPU_CFG, "cuda": CUDA_CFG}
WORKLOAD = "lengths uniform in [S/8, S], one full-length sequence"
STAGES, MICROBATCHES = 2, 4
ROUNDS = {"cpu": 3, "cuda": 10}  # pytest-benchmark rounds per row (CPU steps take ~0.2-2 s here)
INTERLEAVED_ROUNDS = 7  # interleaved rounds of both implementations per case (the least with a ratio interval)
_RESULTS = {}  # case key -> {impl: [seconds per round]}, timed at the case's first row
MODES = ["train", "inference"]

_needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")
_needs_2_gpus = pytest.mark.skipif("torch.cuda.device_count() < 2",
                                   reason="GPipe on CUDA needs 2 GPUs (one per rank)")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_needs_cuda)]
PIPELINE_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_needs_2_gpus)]


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _common_info(device, cfg, real_tokens, mode):
    info = dict(mode=mode, device=device, workload=WORKLOAD, batch=cfg.batch, seqlen=cfg.seqlen,
                d_model=cfg.d_model, nhead=cfg.nhead, dim_feedforward=cfg.dim_feedforward,
                layers=cfg.num_layers, dropout=cfg.dropout if mode == "train" else 0.0, dtype=_name(cfg.dtype),
                real_tokens=real_tokens, padding_fraction=round(1.0 - real_tokens / (cfg.batch * cfg.seqlen), 3),
                torch_version=torch.__version__)
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["peak_memory_note"] = ("CPU: the allocator keeps no peak and the process's maxrss is shared by "
                                    "both stacks; saved_activation_bytes (train) stands in")
    return info


# ---- (a) layers split over devices, one process -------------------------------------------------

class _LayerSplitCase:
    def __init__(self, device, mode):
        cfg = CONFIGS[device]
        self.cfg, self.device, self.mode = cfg, device, mode
        self.devices = devices_for_split(STAGES)
        x, mask, target, self.real_tokens = make_batch(cfg)
        self.x, self.mask = x.to(self.devices[0]), mask.to(self.devices[0])
        self.target = target.to(self.devices[-1])
        self.models = {impl: LayerSplitEncoder(make_encoder(impl, cfg), self.devices).train(mode == "train")
                       for impl in ("torch", "bertkern")}

    def _sync(self):
        if self.device == "cuda":
            for d in sorted({d.index for d in self.devices}):
                torch.cuda.synchronize(d)

    def fn(self, impl):
        model, x, mask, target = self.models[impl], self.x, self.mask, self.target
        params = list(model.parameters())
        if self.mode == "train":
            def train_step():
                for p in params:
                    p.grad = None
                token_loss(model(x, src_key_padding_mask=mask), target).backward()
                self._sync()
            return train_step

        def inference_step():
            with torch.no_grad():
                model(x, src_key_padding_mask=mask)
            self._sync()
        return inference_step

    def memory(self, impl):
        fn, info = self.fn(impl), {}
        if self.mode == "train":
            info["saved_activation_bytes"] = saved_activation_bytes(fn, list(self.models[impl].parameters()))
        if self.device == "cuda":
            peaks = cuda_peak_bytes(fn, self.devices)
            info.update(peak_memory_bytes=max(peaks), peak_memory_bytes_per_device=peaks)
        return info


@pytest.mark.parametrize("impl", ["torch_layer_split", "bertkern_layer_split"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_layer_split(benchmark, mode, device, impl):
    case = _LayerSplitCase(device, mode)
    cfg = case.cfg
    benchmark.group = (f"model_parallel layer_split {mode} {device}-{cfg.batch}x{cfg.seqlen}-d{cfg.d_model}"
                       f"-L{cfg.num_layers}-{_name(cfg.dtype)}")
    which = impl.split("_")[0]
    fn = case.fn(which)
    benchmark.pedantic(fn, rounds=ROUNDS[device], iterations=1, warmup_rounds=1)

    info = _common_info(device, cfg, case.real_tokens, mode)
    info.update(impl=impl, devices=[str(d) for d in case.devices], stages=STAGES,
                cpu_threads=torch.get_num_threads(), **case.memory(which))
    if len(set(case.devices)) < len(case.devices):
        info["device_note"] = f"fewer than {STAGES} GPUs: the same split, all stages on {case.devices[0]}"
    disabled = getattr(benchmark, "disabled", False)  # --benchmark-disable: a quick smoke run
    key = ("layer_split", mode, device)
    if key not in _RESULTS and not disabled:
        _RESULTS[key] = dict(zip(("torch_layer_split", "bertkern_layer_split"),
                                 interleaved_rounds([case.fn("torch"), case.fn("bertkern")], rounds=INTERLEAVED_ROUNDS)))
    if key in _RESULTS:
        rounds = _RESULTS[key]
        info.update(summary(rounds[impl]), interleaved_seconds={n: median(xs) for n, xs in rounds.items()})
        if which == "bertkern":
            info.update(ratio_info("torch_layer_split", rounds["torch_layer_split"], rounds[impl]))
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None
    if seconds:
        info.update(seconds=seconds, tokens_per_s=case.real_tokens / seconds)
    benchmark.extra_info.update(info)


# ---- (b) GPipe pipelining across processes ------------------------------------------------------

_RUNNERS = {}


@pytest.fixture(scope="module")
def pipelines():
    """One PipelineRunner per device kind, started on first use (workers build both stacks and
    both modes once), closed at the end of the module."""
    yield _RUNNERS
    for runner in _RUNNERS.values():
        runner.close()
    _RUNNERS.clear()


def _runner(pipelines, device):
    if device not in pipelines:
        pipelines[device] = PipelineRunner(CONFIGS[device], world_size=STAGES, n_microbatches=MICROBATCHES,
                                           device_type=device)
        for impl in ("torch", "bertkern"):  # metadata inference, lazy init, Triton JIT: untimed
            for mode in MODES:
                pipelines[device].step(impl, mode)
    return pipelines[device]


def _interleaved_worker_rounds(runner, mode, impls, rounds=None):
    """Per-round worker-measured step time (slowest rank) of each impl, impls round-robin."""
    samples = {impl: [] for impl in impls}
    for _ in range(rounds or INTERLEAVED_ROUNDS):
        for impl in impls:
            samples[impl].append(max(runner.step(impl, mode)))
    return samples


@pytest.mark.parametrize("impl", ["pipeline_torch", "pipeline_bertkern"])
@pytest.mark.parametrize("device", PIPELINE_DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_pipeline(benchmark, pipelines, mode, device, impl):
    cfg = CONFIGS[device]
    runner = _runner(pipelines, device)
    which = impl.split("_")[1]
    benchmark.group = (f"model_parallel pipeline {mode} {device}-{cfg.batch}x{cfg.seqlen}-d{cfg.d_model}"
                       f"-L{cfg.num_layers}-{_name(cfg.dtype)}")
    worker_times = []
    benchmark.pedantic(lambda: worker_times.append(max(runner.step(which, mode))),
                       rounds=ROUNDS[device], iterations=1)

    real_tokens = make_batch(cfg)[3]
    worker_seconds = statistics.median(worker_times)
    memory = runner.memory(which, mode)
    info = _common_info(device, cfg, real_tokens, mode)
    info.update(impl=impl, schedule="GPipe", stages=STAGES, n_microbatches=MICROBATCHES, world_size=STAGES,
                backend="nccl" if device == "cuda" else "gloo", devices=[r["device"] for r in runner.info],
                layers_per_rank=[r["layers"] for r in runner.info], cpu_threads=runner.info[0]["threads"],
                threads_note="intra-op threads per rank (torch.set_num_threads in each worker)",
                worker_step_seconds=worker_seconds, worker_step_seconds_all=worker_times,
                seconds=worker_seconds, tokens_per_s=real_tokens / worker_seconds,
                timing_note=("pytest-benchmark's time: one step command sent from the test process "
                             "until every rank replied; worker_step_seconds / tokens_per_s: measured "
                             "inside the workers (slowest rank), median over the rounds"))
    if mode == "train":
        info["saved_activation_bytes"] = sum(m["saved_activation_bytes"] for m in memory)
        info["saved_activation_bytes_per_rank"] = [m["saved_activation_bytes"] for m in memory]
    if device == "cuda":
        peaks = [m["cuda_peak_bytes"] for m in memory]
        info.update(peak_memory_bytes=max(peaks), peak_memory_bytes_per_rank=peaks)
    key = ("pipeline", mode, device)
    if key not in _RESULTS and not getattr(benchmark, "disabled", False):
        samples = _interleaved_worker_rounds(runner, mode, ("torch", "bertkern"))
        _RESULTS[key] = {"pipeline_torch": samples["torch"], "pipeline_bertkern": samples["bertkern"]}
    if key in _RESULTS:
        rounds = _RESULTS[key]
        info.update(summary(rounds[impl]), interleaved_seconds={n: median(xs) for n, xs in rounds.items()})
        if which == "bertkern":
            info.update(ratio_info("pipeline_torch", rounds["pipeline_torch"], rounds[impl]))
    benchmark.extra_info.update(info)
