"""Fused Triton kernels, each beside its torch reference. Importable without triton."""
