"""sterling.kernels — pure functions on tensors.

Each kernel has a plain-PyTorch reference with the same signature; the model
dispatches by device. Nothing here imports torchrec, ray or grpc, and Triton
is optional (imported lazily by the GPU paths).
"""

from sterling.kernels.bits import pack_bits, unpack_bits_range
from sterling.kernels.filter_eval import (
    OP_AND,
    OP_FALSE,
    OP_NOT,
    OP_OR,
    OP_TERM,
    OP_TRUE,
    bloom_term_hits,
    eval_programs,
    exact_term_hits,
)
from sterling.kernels.ivf import ivf_topk, ivf_topk_reference, probe_lists
from sterling.kernels.quant import dequantize_int8, quantize_int8

__all__ = [
    "OP_AND",
    "OP_FALSE",
    "OP_NOT",
    "OP_OR",
    "OP_TERM",
    "OP_TRUE",
    "bloom_term_hits",
    "dequantize_int8",
    "eval_programs",
    "exact_term_hits",
    "ivf_topk",
    "ivf_topk_reference",
    "pack_bits",
    "probe_lists",
    "quantize_int8",
    "unpack_bits_range",
]
