"""The device parametrization shared by the tests that run on CPU and, when a GPU is present, CUDA.

CUDA cases are always collected; on a machine without a GPU they are skipped with a reason, so
`pytest -rs` shows what did not run instead of the cases silently vanishing at collection.
"""
import pytest
import torch

CUDA_SKIP_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False)"


def devices():
    """["cpu", cuda]: the cuda param carries a skipif mark when no GPU is available.

    A function, called by the parametrize decorators at collection: importing this module
    queries no device."""
    return [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)),
    ]
