"""Linear modules over stored (quantized) weights; each replaces a dense ``x @ W.T`` (no bias).

All share one interface: ``in_features``, ``out_features``, ``forward(x)`` for x ``[..., K]`` in any
float dtype (returns x.dtype), ``nbytes`` (bytes of stored weights), ``dequantize(dtype) -> [N, K]``
and the classmethod ``cat_rows(mods)`` that stacks modules of one format along the output dim
(fusing q|k|v|g or gate|up at load time). Weights are buffers, so ``.to(device)`` moves them.
``logits(x)`` is the forward with an fp32 result (the model's output head: bf16 logits are 1/16 apart at
8-16 and flip near-tied greedy picks). On CUDA it is the fp32 accumulator as it is (the GEMV kernels store
fp32, GEMMs use ``mm(out_dtype=)``): free there. On CPU with bf16 activations the fast paths stay and their
result is widened (the grouped q8 int8 op sums its bf16 group results in fp32; fp32 math there took 4x as
long); with fp32 activations everything is fp32 anyway.

On CPU the forward never keeps a dequantized copy: it dequantizes row chunks into temporaries per
call (bounded by ``_FWD_CHUNK_ELEMS``; 16 MB in fp32). On CUDA, q4/q8 decode (<= 8 rows) runs the fused
dequant-GEMV kernels (no dequantized weight at all) and q4 prefill dequantizes into one shared scratch
buffer of at most ``PREFILL_SCRATCH_ELEMS`` weights (row blocks for larger layers) followed by tensor-core
GEMMs; kernels/dequant.py ``clear_scratch()`` frees it. q8 with per-row scales (or one group per row)
and bf16 activations on CPU uses torch's int8 weight-only op ``torch._weight_int8pack_mm`` for small
batches (decode), q8 with group scales the same op once per group on a group-major copy (up to 1 GiB of
such copies per process), q4 with bf16 activations torch's int4 one (``torch._weight_int4pack_mm_for_cpu``,
on a repacked copy built at the first such call). With fp32
activations every format computes in fp32 (no bf16 step anywhere), so a quality comparison in fp32
measures the weight format alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from olmo_local.errors import OlmoError

from ._bnb import bnb_functional
from .formats import dequantize_4bit_range, dequantize_q4, dequantize_q8, nf4_absmax, q8_group_size, unpack_q4

_FWD_CHUNK_ELEMS = 1 << 22  # weight elements dequantized at once in a forward (16 MB in fp32)
_FWD_CHUNK_ELEMS_DECODE = 1 << 18  # for <= 16 input rows: small cache-resident chunks are ~3x faster
_INT8PACK_MAX_M = 128  # torch._weight_int8pack_mm beats dequantize + GEMM up to about this many rows
_HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")
# torch's int4 weight-only CPU op: ~21x faster than dequantize + GEMM for one bf16 row of a 1B-sized
# layer (0.62 vs 13.2 ms for 5632 x 2048 on the 2-core VM), still faster at 64 rows, slower at 512
_INT4PACK_MAX_M = 64
# q8 with group scales: the int8 op per group on a group-major copy ([K/G, N, G]; 15x faster for a 1B
# lm_head, 185 -> 12.6 ms per bf16 row). Copies are built at first use up to this many bytes per process
# (the lm_head of a q4 7B is 385 MB); layers past it keep the chunked dequantization.
_INT8_GROUPED_BUDGET = 1 << 30
_int8_grouped_bytes = 0
_HAS_INT4PACK = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def _release_grouped(nbytes: int) -> None:
    global _int8_grouped_bytes
    _int8_grouped_bytes -= nbytes


def _chunked_matmul(x: torch.Tensor, n: int, k: int, deq: Callable[[int, int, torch.dtype], torch.Tensor]):
    """x [..., K] @ W.T where deq(r0, r1, dtype) returns rows r0:r1 of W; output in x.dtype."""
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x.is_cuda:  # GPU prefill: dequantize the whole layer once into a temporary, one tensor-core GEMM
        return (x2 @ deq(0, n, x.dtype).T).reshape(*lead, n)
    rows = max(1, (_FWD_CHUNK_ELEMS_DECODE if x2.shape[0] <= 16 else _FWD_CHUNK_ELEMS) // k)
    if rows >= n:
        return (x2 @ deq(0, n, x.dtype).T).reshape(*lead, n)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.matmul(x2, deq(r0, r1, x.dtype).T, out=out[:, r0:r1])
    return out.reshape(*lead, n)


def _q8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W.T for q8 (per-row scales [N] or group scales [N, K/G]); output in x.dtype."""
    n, k = qweight.shape
    if scales.dim() == 2 and scales.shape[1] == 1:  # one group per row (K <= G): per-row scales
        scales = scales[:, 0]
    if (
        _HAS_INT8PACK
        and scales.dim() == 1
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.shape[-1] == k
        and x.numel() // k <= _INT8PACK_MAX_M
    ):
        y = torch._weight_int8pack_mm(x.reshape(-1, k), qweight, scales.to(torch.bfloat16))
        return y.reshape(*x.shape[:-1], n)
    return _chunked_matmul(x, n, k, lambda r0, r1, dt: dequantize_q8(qweight[r0:r1], scales[r0:r1], dt))


def mm_fp32(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ w.T [K, N] with an fp32 result. CUDA: a tensor-core GEMM in the inputs' dtype whose fp32
    accumulator is stored as it is (``torch.mm(..., out_dtype=)``); elsewhere in fp32."""
    if x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16) and w.dtype == x2.dtype:
        try:
            return torch.mm(x2, w.t(), out_dtype=torch.float32)
        except (TypeError, NotImplementedError):  # a torch without mm(out_dtype=); out of memory propagates
            pass
    return x2.float() @ w.float().t()


def dense_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T for a dense weight w [N, K], fp32 result (see the module docstring): on CUDA the
    GEMM's fp32 accumulator as it is; on CPU the plain linear, widened (a bf16 head computed in fp32 there
    took 2.5x as long: 27 vs 10.5 ms for a quarter of the 7B head on the 2-core VM). Training (a weight that
    needs grad) keeps the plain linear in x.dtype: its loss upcasts, and autograd has no mm(out_dtype=)."""
    w = w if w.dtype == x.dtype else w.to(x.dtype)
    if w.requires_grad and torch.is_grad_enabled():
        return nn.functional.linear(x, w)
    if x.is_cuda and x.dtype != torch.float32:
        return mm_fp32(x.reshape(-1, w.shape[1]), w).reshape(*x.shape[:-1], w.shape[0])
    return nn.functional.linear(x, w).float()


class _QLinearBase(nn.Module):
    in_features: int
    out_features: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The forward with an fp32 result (the output head). This default (nf4) widens the forward's result;
        dense, q8 and q4 override it to store their fp32 accumulator on CUDA."""
        return self.forward(x).float()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _drop_cpu_copy(self) -> None:
        """Forget a repacked copy kept for a CPU op (Q4Linear, Q8Linear); none here."""

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda(): a CPU copy is rebuilt where needed
        self._drop_cpu_copy()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    @staticmethod
    def _check_cat(mods: Sequence[nn.Module], cls: type) -> None:
        if not mods:
            raise ValueError("cat_rows needs at least one module")
        for m in mods:
            if type(m) is not cls:
                raise OlmoError(f"cannot fuse {type(m).__name__} with {cls.__name__}: mixed weight formats")
            if m.in_features != mods[0].in_features:
                raise OlmoError(
                    f"cannot fuse linears with different in_features ({m.in_features} vs {mods[0].in_features})"
                )


# --------------------------------------------------------------------------------------------- #


class DenseLinear(_QLinearBase):
    """Unquantized weight [N, K] (any float dtype); forward casts it to x.dtype if needed."""

    def __init__(self, weight: torch.Tensor, trainable: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if trainable:  # training the demo model: a real parameter
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return nn.functional.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return dense_logits(x, self.weight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.detach().to(dtype)

    @classmethod
    def cat_rows(cls, mods: Sequence[DenseLinear]) -> DenseLinear:
        cls._check_cat(mods, cls)
        return cls(torch.cat([m.weight.detach() for m in mods], 0))


PREFILL_SCRATCH_ELEMS = 32 * 2**20  # dequantized weight elements a prefill GEMM may hold on CUDA


class Q4Linear(_QLinearBase):
    """q4 (contracts.md): qweight uint8 [N, K/2], scales/mins fp16 [N, K/G]; 4 + 32/G bits per weight.

    ``tile_()`` (called when the model is placed on a GPU) rearranges the same bytes into the decode
    GEMV's tiled layout (kernels/gemv_q4.py: slabs of 64 rows stored group-major, one contiguous
    stream per program); ``tiled`` says which layout the buffers hold. Files and CPU keep the
    standard layout; ``standard(r0, r1)`` returns it for any rows."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int | None = None):
        super().__init__()
        self.out_features = qweight.shape[0]
        self.in_features = 2 * qweight.shape[1]
        self.group_size = group_size or self.in_features // scales.shape[1]
        self.tiled = False
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self._cpu_pack: tuple | None = None  # (key, packed weight, scales_and_zeros) for the int4 CPU op

    def _drop_cpu_copy(self) -> None:
        self._cpu_pack = None

    def _int4pack(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The same weights in torch's int4 CPU layout (built on first use, ~0.53 B per weight beside the
        stored q4): codes via _convert_weight_to_int4pack_for_cpu, per-group (scale, zero) in bf16 with
        zero = min + 8 * scale, since the op computes (q - 8) * scale + zero = q * scale + min. None when
        the op refuses the shape."""
        key = (self.qweight.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr())
        if self._cpu_pack is None or self._cpu_pack[0] != key:
            try:
                q = unpack_q4(self.qweight, self.group_size).to(torch.int32)
                packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
                s, m = self.scales.float(), self.mins.float()
                sz = torch.stack([s, m + 8 * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
                self._cpu_pack = (key, packed, sz)
            except RuntimeError:
                self._cpu_pack = (key, None, None)
        return None if self._cpu_pack[1] is None else self._cpu_pack[1:]

    def tile_(self) -> bool:
        """Switch to the tiled layout when the rows allow it (a multiple of 128: whole 64-row slabs,
        also in each half of a merged gate|up); returns whether the layer is tiled."""
        from olmo_local.kernels.gemv_q4 import TILE_ROWS, q4_tile

        if not self.tiled and self.out_features % (2 * TILE_ROWS) == 0:
            self.qweight, self.scales, self.mins = q4_tile(self.qweight, self.scales, self.mins, self.group_size)
            self.tiled = True
        return self.tiled

    def standard(self, r0: int = 0, r1: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, mins) of rows r0:r1 in the standard layout."""
        r1 = self.out_features if r1 is None else r1
        if not self.tiled:
            return self.qweight[r0:r1], self.scales[r0:r1], self.mins[r0:r1]
        from olmo_local.kernels.gemv_q4 import TILE_ROWS, q4_untile

        a, b = r0 // TILE_ROWS * TILE_ROWS, -(-r1 // TILE_ROWS) * TILE_ROWS  # whole slabs
        qw, sc, mn = q4_untile(self.qweight[a:b], self.scales[a:b], self.mins[a:b], self.group_size)
        return qw[r0 - a:r1 - a], sc[r0 - a:r1 - a], mn[r0 - a:r1 - a]

    def _deq_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_q4(*self.standard(r0, r1), self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_HAS_INT4PACK and x.device.type == "cpu" and x.dtype == torch.bfloat16 and not self.tiled
                and x.shape[-1] == self.in_features and x.numel() <= _INT4PACK_MAX_M * self.in_features):
            pack = self._int4pack()  # CPU decode: torch's int4 weight-only op
            if pack is not None:
                y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), pack[0], self.group_size,
                                                      pack[1])
                return y.reshape(*x.shape[:-1], self.out_features)
        y = self._gemv(x, x.dtype)
        if y is not None:
            return y
        if x.is_cuda:  # prefill: one-pass dequantize into a shared scratch buffer, tensor-core GEMMs
            from olmo_local.kernels.dequant import q4_dequantize_scratch
            fresh = torch.is_grad_enabled() and x.requires_grad  # autograd keeps the weight for backward
            n, k = self.out_features, self.in_features
            rows = n if fresh else max(64, PREFILL_SCRATCH_ELEMS // k // 64 * 64)  # whole 64-row slabs
            if rows >= n:
                w = q4_dequantize_scratch(self.qweight, self.scales, self.mins, self.group_size, x.dtype, fresh,
                                          tiled=self.tiled)
                return nn.functional.linear(x, w)
            # large layers in row blocks: the scratch stays at PREFILL_SCRATCH_ELEMS (64 MB in bf16)
            # instead of the largest layer (169 MB for the 7B gate|up), which counts at a 4K context
            parts = []
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                w = q4_dequantize_scratch(self.qweight[r0:r1], self.scales[r0:r1], self.mins[r0:r1],
                                          self.group_size, x.dtype, tiled=self.tiled)
                parts.append(nn.functional.linear(x, w))
            return torch.cat(parts, dim=-1)
        return _chunked_matmul(x, self.out_features, self.in_features, self._deq_rows)

    def _gemv(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """CUDA decode (<= 8 rows): the fused dequant-GEMV kernel, its result stored in ``dtype``; else None."""
        if not (x.is_cuda and x.numel() <= 8 * self.in_features):
            return None
        from olmo_local.kernels.gemv_q4 import q4_gemv
        x2 = x.reshape(-1, self.in_features)
        out = torch.empty(x2.shape[0], self.out_features, dtype=dtype, device=x.device)
        q4_gemv(x2, self.qweight, self.scales, self.mins, self.group_size, out, tiled=self.tiled)
        return out.reshape(*x.shape[:-1], self.out_features)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        y = self._gemv(x, torch.float32)
        return y if y is not None else self.forward(x).float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._deq_rows(0, self.out_features, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}" + (", tiled" if self.tiled else "")

    @classmethod
    def cat_rows(cls, mods: Sequence[Q4Linear]) -> Q4Linear:
        cls._check_cat(mods, cls)
        if any(m.group_size != mods[0].group_size for m in mods):
            raise OlmoError("cannot fuse q4 linears with different group sizes")
        parts = [m.standard() for m in mods]
        return cls(
            torch.cat([p[0] for p in parts], 0),
            torch.cat([p[1] for p in parts], 0),
            torch.cat([p[2] for p in parts], 0),
            mods[0].group_size,
        )


def tile_q4_layers(model: nn.Module) -> int:
    """Put every q4 linear of a model on a CUDA device into the decode GEMV's tiled layout (a one-time
    rearrangement of the same bytes, layer by layer); returns how many layers were tiled."""
    return sum(1 for m in model.modules() if isinstance(m, Q4Linear) and m.qweight.is_cuda and m.tile_())


def q4_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int = 128
) -> torch.Tensor:
    """Reference for the q4 GEMM/GEMV kernels: dequantize to fp32, x.float() @ W.T in fp32, cast to
    x.dtype. x [..., K], qweight uint8 [N, K/2], scales/mins fp16 [N, K/G] -> [..., N]."""
    n, kh = qweight.shape
    k = 2 * kh
    q = unpack_q4(qweight, group_size).reshape(n, k // group_size, group_size).float()
    w = (q * scales.float()[..., None] + mins.float()[..., None]).reshape(n, k)
    return (x.float() @ w.T).to(x.dtype)


class Q8Linear(_QLinearBase):
    """q8: qweight int8 [N, K] and either group scales fp16 [N, K/G] (w = q * scales[n, k // G]; 8 + 16/G
    bits per weight) or per-row scales [N] (fp16 for older q8 checkpoints, fp32 SCB/127 for
    bitsandbytes int8; w = q * scales[n]; 8 + 16/K bits, 8 + 32/K with fp32). ``group_size`` is 0 for
    per-row scales."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.group_size = q8_group_size(qweight, scales)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self._cpu_groups: tuple | None = None  # (key, [K/G, N, G] int8, [K/G, N] bf16) for the int8 CPU op

    def _drop_cpu_copy(self) -> None:
        if self._cpu_groups is not None and self._cpu_groups[3] is not None:
            self._cpu_groups[3]()  # the finalizer: gives the copy's bytes back to the budget (once)
        self._cpu_groups = None

    def _grouped(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Group-major copy of a group-scaled q8 weight for torch's int8 CPU op (within the budget)."""
        global _int8_grouped_bytes
        key = (self.qweight.data_ptr(), self.scales.data_ptr())
        if self._cpu_groups is None or self._cpu_groups[0] != key:
            self._drop_cpu_copy()
            n, k, g = self.out_features, self.in_features, self.group_size
            if _int8_grouped_bytes + n * k > _INT8_GROUPED_BUDGET:
                self._cpu_groups = (key, None, None, None)
            else:
                slabs = self.qweight.reshape(n, k // g, g).transpose(0, 1).contiguous()
                _int8_grouped_bytes += slabs.numel()
                # a module dropped without .to() (another model loaded) releases its share too
                fin = weakref.finalize(self, _release_grouped, slabs.numel())
                self._cpu_groups = (key, slabs, self.scales.t().contiguous().to(torch.bfloat16), fin)
        return None if self._cpu_groups[1] is None else self._cpu_groups[1:3]

    def _deq_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_q8(self.qweight[r0:r1], self.scales[r0:r1], dtype)

    def _fp32_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """CPU decode with bf16 x and group scales: x @ W.T as [M, N] fp32 from the int8 op per group (each
        group's result bf16, their sum fp32); None where that path does not apply."""
        if (_HAS_INT8PACK and x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.scales.dim() == 2
                and 0 < self.group_size < self.in_features and x.shape[-1] == self.in_features
                and x.numel() <= _INT8PACK_MAX_M * self.in_features):
            grouped = self._grouped()  # CPU decode: the int8 op per group, summed in fp32
            if grouped is not None:
                slabs, sc = grouped
                x2, g = x.reshape(-1, self.in_features), self.group_size
                y = torch.zeros(x2.shape[0], self.out_features, dtype=torch.float32)
                for i in range(slabs.shape[0]):
                    y += torch._weight_int8pack_mm(x2[:, i * g:(i + 1) * g], slabs[i], sc[i]).float()
                return y
        return None

    def _gemv(self, x: torch.Tensor, dtype: torch.dtype, any_scales: bool = False) -> torch.Tensor | None:
        """CUDA decode (<= 8 rows): the fused dequant-GEMV kernel, its result stored in ``dtype``. The forward
        takes it for fp16 scales only; the head (``any_scales``) for every scale dtype, as the decode step's
        head always did (bitsandbytes int8's fp32 row scales included)."""
        if x.is_cuda and x.numel() <= 8 * self.in_features and (any_scales or self.scales.dtype == torch.float16):
            from olmo_local.kernels.gemv_q8 import q8_gemv
            x2 = x.reshape(-1, self.in_features)
            out = torch.empty(x2.shape[0], self.out_features, dtype=dtype, device=x.device)
            return q8_gemv(x2, self.qweight, self.scales, out).reshape(*x.shape[:-1], self.out_features)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fp32_rows(x)
        if y is not None:
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        y = self._gemv(x, x.dtype)
        return y if y is not None else _q8_matmul(x, self.qweight, self.scales)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fp32_rows(x)
        if y is not None:
            return y.reshape(*x.shape[:-1], self.out_features)
        y = self._gemv(x, torch.float32, any_scales=True)
        if y is not None:
            return y
        if x.is_cuda and x.dtype != torch.float32:  # many rows: the bf16 weight once, fp32 out
            w = self.dequantize(x.dtype)
            return mm_fp32(x.reshape(-1, self.in_features), w).reshape(*x.shape[:-1], self.out_features)
        return self.forward(x).float()  # CPU: the forward's fast paths (fp32 math for fp32 x), widened

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._deq_rows(0, self.out_features, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size or 'row'}"

    @classmethod
    def cat_rows(cls, mods: Sequence[Q8Linear]) -> Q8Linear:
        """Stack along the output dim. Mixed layouts are made common without changing any value: per-row
        scales are repeated over the groups, and groups are split down to the smallest group size."""
        cls._check_cat(mods, cls)
        sdt = mods[0].scales.dtype
        for m in mods[1:]:
            sdt = torch.promote_types(sdt, m.scales.dtype)
        sizes = {m.group_size for m in mods}
        if sizes == {0}:
            return cls(torch.cat([m.qweight for m in mods], 0),
                       torch.cat([m.scales.to(sdt) for m in mods], 0))
        g = min(sizes - {0})
        k = mods[0].in_features
        scales = []
        for m in mods:
            s = m.scales.to(sdt)
            scales.append(s[:, None].expand(-1, k // g) if m.group_size == 0
                          else s.repeat_interleave(m.group_size // g, dim=1))
        return cls(torch.cat([m.qweight for m in mods], 0), torch.cat(scales, 0).contiguous())


class NF4Linear(_QLinearBase):
    """bitsandbytes nf4/fp4: packed uint8 data [N*K/2, 1] + its QuantState, kept as buffers
    (absmax, quant_map, and with double quant nested_absmax, nested_quant_map). Dequantized in row
    chunks: with bitsandbytes' kernel when rows hold whole blocks, else with
    quant.formats.dequantize_4bit_range (bitsandbytes 0.50's CPU kernel is wrong when blocks straddle rows). 4.5 bits per weight at blocksize 64 (4.127 with double quant)."""

    def __init__(self, weight: torch.Tensor, quant_state):
        super().__init__()
        qs = quant_state
        if qs.shape is None or len(qs.shape) != 2:
            raise OlmoError(f"nf4: quant state has shape {qs.shape}, expected a 2-D weight shape")
        self.out_features, self.in_features = int(qs.shape[0]), int(qs.shape[1])
        self.quant_type = qs.quant_type
        self.blocksize = int(qs.blocksize)
        self.weight_dtype = qs.dtype
        self.register_buffer("weight", weight)
        self.register_buffer("absmax", qs.absmax)
        self.register_buffer("quant_map", qs.code)
        self.nested = bool(qs.nested)
        if self.nested:
            self.register_buffer("nested_absmax", qs.state2.absmax)
            self.register_buffer("nested_quant_map", qs.state2.code)
            self.register_buffer("nested_offset", torch.as_tensor(qs.offset, dtype=torch.float32).reshape(()))
            self.nested_blocksize = int(qs.state2.blocksize)
            self.nested_dtype = qs.state2.dtype

    @property
    def quant_state(self):
        """A bitsandbytes QuantState over this module's (current-device) buffers."""
        QuantState = bnb_functional().QuantState

        state2 = offset = None
        if self.nested:
            state2 = QuantState(
                absmax=self.nested_absmax,
                blocksize=self.nested_blocksize,
                code=self.nested_quant_map,
                dtype=self.nested_dtype,
            )
            offset = self.nested_offset
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.quant_map,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.weight_dtype,
            offset=offset,
            state2=state2,
        )

    def _deq_rows(self, r0: int, r1: int, dtype: torch.dtype, absmax: torch.Tensor | None = None) -> torch.Tensor:
        # values rounded to the stored dtype first, as bitsandbytes' dequantize_4bit returns them
        k, bs = self.in_features, self.blocksize
        absmax = self.absmax_fp32() if absmax is None else absmax
        if k % bs == 0:  # whole blocks per row: bitsandbytes' own kernel (correct here, and fast)
            bnbf = bnb_functional()
            qs = bnbf.QuantState(absmax=absmax[r0 * k // bs: r1 * k // bs], shape=torch.Size((r1 - r0, k)),
                                 code=self.quant_map, blocksize=bs, quant_type=self.quant_type,
                                 dtype=self.weight_dtype)
            w = bnbf.dequantize_4bit(self.weight.reshape(-1)[r0 * k // 2: r1 * k // 2].reshape(-1, 1), qs)
        else:
            w = dequantize_4bit_range(self.weight, absmax, self.quant_map, bs, r0 * k, r1 * k)
            w = w.view(r1 - r0, k).to(self.weight_dtype)
        return w if w.dtype == dtype else w.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._deq_rows(0, self.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        absmax = self.absmax_fp32()  # once per call (undoes double quant)
        return _chunked_matmul(x, self.out_features, self.in_features,
                               lambda r0, r1, dt: self._deq_rows(r0, r1, dt, absmax))

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax as fp32 (undoing double quant if present)."""
        if not self.nested:
            return self.absmax.float()
        return nf4_absmax(self.quant_state)

    @classmethod
    def cat_rows(cls, mods: Sequence[NF4Linear]) -> NF4Linear:
        QuantState = bnb_functional().QuantState

        cls._check_cat(mods, cls)
        m0 = mods[0]
        for m in mods:
            if m.in_features % m.blocksize or m.blocksize != m0.blocksize:
                raise OlmoError(
                    f"cannot fuse nf4 linears: in_features {m.in_features} must be a multiple of one common "
                    f"blocksize (got {m.blocksize} and {m0.blocksize})"
                )
            if m.quant_type != m0.quant_type or m.weight_dtype != m0.weight_dtype:
                raise OlmoError("cannot fuse bitsandbytes 4-bit linears of different quant types or dtypes")
        n = sum(m.out_features for m in mods)
        weight = torch.cat([m.weight.reshape(-1) for m in mods], 0).reshape(-1, 1)
        qs = QuantState(
            absmax=torch.cat([m.absmax_fp32() for m in mods], 0),
            shape=torch.Size((n, m0.in_features)),
            code=m0.quant_map,
            blocksize=m0.blocksize,
            quant_type=m0.quant_type,
            dtype=m0.weight_dtype,
        )
        return cls(weight, qs)


# --------------------------------------------------------------------------------------------- #


class QEmbedding(nn.Module):
    """Embedding table in q8 (int8 [V, D] + group scales [V, D/G] or per-row scales [V]); only looked-up
    rows are dequantized. Output dtype is ``dtype``."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype | None = None,
                    group_size: int | None = None) -> QEmbedding:
        from .formats import quantize_q8

        d = quantize_q8(weight, group_size=group_size)
        return cls(d["qweight"], d["scales"], dtype or weight.dtype)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from olmo_local.kernels.embed import q8_embed  # one launch on CUDA, the torch form on CPU

        return q8_embed(ids, self.qweight, self.scales, self.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_q8(self.qweight, self.scales, dtype)

    def as_linear(self) -> Q8Linear:
        """The tied output head ``h @ table.T`` as a Q8Linear over the same storage (no copy)."""
        return Q8Linear(self.qweight, self.scales)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"


__all__ = [
    "DenseLinear",
    "dense_logits",
    "mm_fp32",
    "NF4Linear",
    "Q4Linear",
    "Q8Linear",
    "QEmbedding",
    "q4_linear_ref",
]
