"""Fused Triton kernels, each beside its torch reference. Importable without triton.

One module per op; each holds `<op>_ref` (plain torch, fp32 math: the CPU path), `<op>_triton` (same
signature, plus keyword-only tuning knobs) and `<op>` (dispatch: Triton for CUDA tensors when
triton is installed, the reference otherwise; override with `backend("torch"|"triton"|"auto")`
or OLMO_LOCAL_KERNELS).

Decode-path ops (batch 1, CUDA-graph capturable: no host syncs, static shapes, optional out=):
  q4_gemv / q4_gemv_silu_mul              gemv_q4.py
  q8_gemv / q8_gemv_silu_mul              gemv_q8.py
  nf4_gemv (bitsandbytes nf4 / fp4, one row of x)   gemv_nf4.py
  gdn_decode_step                         gdn_decode.py
  attention_decode / quantize_kv_int8     attention_decode.py
  rmsnorm / add_rmsnorm / rmsnorm_add     norm.py
  q8_embed (the q8 embedding rows of the step's token)                               embed.py
  sample_triton (temperature, top-p, min-p and the draw of a sampling graph)          sample.py
  greedy_triton (the argmax of a greedy graph, with the token feedback)               sample.py
Prefill ops:
  q4_dequantize_into / q4_dequantize_scratch   dequant.py (one-pass q4 -> bf16 for a tensor-core GEMM)
  gdn_prefill_prep / gated_rms_norm           gdn_prefill.py (conv + SiLU + q/k norms; the gated norm)
  gdn_recurrent_prefill                       gdn_recurrent.py (the delta rule of a prompt, one launch)
Ops that keep scratch buffers (split-K partials, counters) allocate them on first use: call each
op once before capturing a CUDA graph.
"""

from ._triton import HAS_TRITON, backend, current_backend
from .attention_decode import attention_decode, quantize_kv_int8
from .dequant import q4_dequantize_into, q4_dequantize_scratch
from .gdn_decode import gdn_decode_step
from .gemv_q4 import q4_dequantize, q4_gemv, q4_gemv_silu_mul
from .gemv_nf4 import nf4_gemv
from .gemv_q8 import q8_gemv, q8_gemv_silu_mul
from .norm import add_rmsnorm, rmsnorm, rmsnorm_add

__all__ = [
    "HAS_TRITON",
    "add_rmsnorm",
    "attention_decode",
    "backend",
    "current_backend",
    "gdn_decode_step",
    "nf4_gemv",
    "q4_dequantize",
    "q4_dequantize_into",
    "q4_dequantize_scratch",
    "q4_gemv",
    "q4_gemv_silu_mul",
    "q8_gemv",
    "q8_gemv_silu_mul",
    "quantize_kv_int8",
    "rmsnorm",
    "rmsnorm_add",
]
