"""Kernel package plumbing: importable without triton, backend selection."""

import subprocess
import sys

import olmo_local.kernels as K
import pytest
import torch

NO_TRITON = """
import builtins
real = builtins.__import__
def blocked(name, *args, **kwargs):
    if name == "triton" or name.startswith("triton."):
        raise ImportError("triton hidden for this test")
    return real(name, *args, **kwargs)
builtins.__import__ = blocked
import torch
import olmo_local.kernels as K
assert not K.HAS_TRITON
x = torch.randn(2, 16)
print(K.rmsnorm(x, torch.ones(16), 1e-6).shape[1], K.current_backend())
"""


def test_import_without_triton():
    res = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["16", "auto"]


def test_backend_context():
    assert K.current_backend() == "auto"
    with K.backend("torch"):
        assert K.current_backend() == "torch"
        with K.backend("triton"):
            assert K.current_backend() == "triton"
        assert K.current_backend() == "torch"
    assert K.current_backend() == "auto"
    with pytest.raises(ValueError), K.backend("cuda"):
        pass


def test_auto_uses_reference_on_cpu(monkeypatch):
    from olmo_local.kernels import norm

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors under 'auto'")

    monkeypatch.setattr(norm, "rmsnorm_triton", boom)
    x = torch.randn(1, 8)
    K.rmsnorm(x, torch.ones(8), 1e-6)
    with K.backend("triton"), pytest.raises(AssertionError):
        K.rmsnorm(x, torch.ones(8), 1e-6)
