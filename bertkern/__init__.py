"""bertkern: fused Triton / CUDA C++ kernels for BERT-style encoders in PyTorch.

Importing bertkern loads the compiled operator library (bertkern._C), which registers the
``torch.ops.bertkern.*`` operators for CPU (and CUDA when it was built with a CUDA toolkit).
No device is queried at import time.
"""
import torch  # noqa: F401  (loads libc10 / libtorch, which bertkern._C links against)

from bertkern import _C  # noqa: F401  (registers torch.ops.bertkern.*)
from bertkern import hf, ops
from bertkern.nn import Encoder, EncoderLayer, LayerNorm
from bertkern.models import BertConfig, BertModel

__version__ = "0.1.0"

__all__ = ["hf", "ops", "Encoder", "EncoderLayer", "LayerNorm", "BertModel", "BertConfig", "cuda_kernels_built"]


def cuda_kernels_built() -> bool:
    """True when this build of bertkern._C contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("bertkern::layer_norm_fwd", "CUDA")
