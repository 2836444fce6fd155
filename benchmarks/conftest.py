"""Benchmark-suite settings: record the software and hardware next to pytest-benchmark's
machine_info, so a report (python -m bertkern.bench report) says what produced its numbers."""
import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    import bertkern
    from bertkern.ops.linear import onednn_linear_enabled

    machine_info["torch_version"] = torch.__version__
    machine_info["bertkern_version"] = bertkern.__version__
    machine_info["cpu_threads"] = torch.get_num_threads()
    machine_info["cpu_gemm"] = "onednn" if onednn_linear_enabled() else "torch (MKL)"
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
