"""cuattn: flash attention for NumPy, CuPy, PyTorch and JAX arrays.

CUDA kernels compiled at run time (NVRTC, through CuPy) on the GPU; a numba backend
computing the same on the CPU. The function computed is described in docs/semantics.md.
"""

__version__ = "0.1.0"

from .api import attention, attention_varlen, attention_with_kvcache, merge_attention_states
from .backends import BackendUnavailable
from .kvcache import KVCache

__all__ = [
    "BackendUnavailable",
    "KVCache",
    "__version__",
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "merge_attention_states",
]
