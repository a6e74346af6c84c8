"""One place that imports bitsandbytes (nf4 and bitsandbytes-int8 interop).

bitsandbytes' CPU backend logs a warning at import when the optional ``kernels`` package (a faster
CPU 4-bit GEMM) is missing; the fallback it then uses is correct, so the warning is silenced here
instead of being printed in the middle of every command's output.
"""

from __future__ import annotations

import logging

from olmo_local.errors import OlmoError


def bnb_functional():
    """``bitsandbytes.functional`` (quantize_4bit, dequantize_4bit, QuantState, ...)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise OlmoError("bitsandbytes is not installed (needed for nf4 / bitsandbytes checkpoints): "
                        "pip install bitsandbytes") from None
    return bnbf
