"""Quantized weight formats (q4, q8, nf4), quantization, checkpoint I/O, bitsandbytes interop."""

from .checkpoint import expected_names, load_embedding, load_linear, quantize_linear_tensors
from .formats import (
    bits_per_weight,
    dequantize_nf4,
    dequantize_q4,
    dequantize_q8,
    pack_q4,
    quantize_nf4,
    quantize_q4,
    quantize_q8,
    unpack_q4,
)
from .linear import DenseLinear, NF4Linear, Q4Linear, Q8Linear, QEmbedding, q4_linear_ref

__all__ = [
    "DenseLinear",
    "NF4Linear",
    "Q4Linear",
    "Q8Linear",
    "QEmbedding",
    "bits_per_weight",
    "dequantize_nf4",
    "dequantize_q4",
    "dequantize_q8",
    "expected_names",
    "load_embedding",
    "load_linear",
    "pack_q4",
    "q4_linear_ref",
    "quantize_linear_tensors",
    "quantize_nf4",
    "quantize_q4",
    "quantize_q8",
    "unpack_q4",
]
