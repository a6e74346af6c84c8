"""The Triton kernels inside the GPU scripts, in the interpreter: scripts/gpu_stream_probe.py (a load-only
bandwidth probe, each program XORs its split of a row's words) against its torch reference, and
scripts/gpu_floor_probe.py's empty kernel and grid barriers."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_probe():
    spec = importlib.util.spec_from_file_location("gpu_stream_probe", ROOT / "scripts" / "gpu_stream_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stream_probe_kernel_matches_xor_reference():
    probe = _load_probe()
    nr, kw, bn, bw = 37, 100, 16, 16  # odd rows, a split that ends inside a block
    w = torch.randint(-2**31, 2**31 - 1, (nr, kw), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    wps = 48  # words per split: 3 blocks of 16 -> splits [0,48), [48,96), [96,100)
    split = -(-kw // wps)
    y = torch.zeros(split * nr, dtype=torch.int32)
    probe._probe[(split, -(-nr // bn))](w, y, nr, kw, wps, BN=bn, BW=bw)
    for s in range(split):
        part = w[:, s * wps:min(kw, (s + 1) * wps)]
        want = part[:, 0].clone()
        for c in range(1, part.shape[1]):
            want ^= part[:, c]
        assert torch.equal(y[s * nr:(s + 1) * nr], want)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_floor_probe_kernels_in_the_interpreter():
    """scripts/gpu_floor_probe.py times an empty kernel and grid barriers. In the interpreter (programs one
    after another) a single program passes each barrier once it has arrived: NB barriers leave the
    counter at NB (the k-th waits for k arrivals). The empty kernel writes nothing."""
    probe = _load("gpu_floor_probe")
    cnt = torch.zeros(1, dtype=torch.int32)
    probe._barriers[(1,)](cnt, 5)
    assert int(cnt) == 5
    x = torch.full((1,), 3.0)
    probe._empty[(4,)](x, USE_PDL=False)
    assert float(x) == 3.0


def test_pre_hopper_wide_gemv_builds_without_spills():
    """Below sm_90 the q4 launch gives the wide programs 32 rows per warp (the 64-row ones spill there: 255
    registers and local memory in the main loop). Triton's own compiler builds every wide variant the decode
    step launches for sm_86 (RTX 30 series; no GPU needed): each must fit in registers and shared memory."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_kernels.py"), "--aot", "--arch", "86",
                          "--only", "as launched below sm_90"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # compiled, not interpreted
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(lines) >= 10 and all(ln.startswith("[PASS]") and "stack 0 " in ln for ln in lines), "\n".join(lines)
