"""Quantized weight formats (q4, q8, nf4), quantization, checkpoint I/O, bitsandbytes interop."""
