"""Gated delta rule (spec §5.5, §5.7): torch reference ops, chunked (prefill) and recurrent (decode).

Shapes (single layer, B sequences, H value heads; q/k already repeated to H heads, L2-normed, and
q already scaled by dk**-0.5):
    q, k: [B, T, H, dk]   v: [B, T, H, dv]   g (log decay, <= 0), beta: [B, T, H]
    state: [B, H, dk, dv] fp32
All arithmetic is in fp32 (or fp64 when the inputs are fp64); outputs are fp32/fp64.
Both functions are written with out-of-place ops so autograd works through them (training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, beta_scale: float,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, beta) from the raw gate projections a, b [..., Hv] (spec §5.4), computed in ``dtype``:
    log decay g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b) * beta_scale (2 when negative
    eigenvalues are allowed). Out-of-place ops: autograd works through it."""
    g = -A_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype))
    return g, torch.sigmoid(b.to(dtype)) * beta_scale


def mask_gates(g: torch.Tensor, beta: torch.Tensor, n_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates [B, T, Hv] with the tokens from ``n_valid`` (a device int tensor of one element) on turned
    into no-ops: g = 0 (no decay) and beta = 0 (no write), so padding after a prompt leaves the state as
    the prompt left it. None: unchanged."""
    if n_valid is None:
        return g, beta
    keep = (torch.arange(g.shape[1], device=g.device) < n_valid.reshape(1)).to(g.dtype)[None, :, None]
    return g * keep, beta * keep


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_MASKS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _masks(C: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(strictly-above-diagonal mask, identity) for chunk size C, cached (two launches less per call)."""
    key = (C, dtype, str(device))
    if key not in _MASKS:
        with torch.inference_mode(False):  # normal tensors: autograd may save them later
            ones = torch.ones(C, C, dtype=torch.bool, device=device)
            _MASKS[key] = (ones.triu(1), torch.eye(C, dtype=dtype, device=device))
    return _MASKS[key]


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, initial_state: torch.Tensor | None = None,
                           chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY / UT-transform) form of the gated delta rule. Returns (o [B,T,H,dv], final state)."""
    dt = _compute_dtype(q)
    q, k, v = (x.to(dt).transpose(1, 2) for x in (q, k, v))
    g, beta = (x.to(dt).transpose(1, 2) for x in (g, beta))
    o, S = chunk_gated_delta_rule_heads(q, k, v, g, beta, initial_state, chunk_size)
    return o.transpose(1, 2), S


def chunk_gated_delta_rule_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                 beta: torch.Tensor, initial_state: torch.Tensor | None = None,
                                 chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_gated_delta_rule in the head-first layout the batched matmuls want (no copies when the
    inputs are contiguous and T is a multiple of the chunk size):
    q, k [B,H,T,dk], v [B,H,T,dv], g, beta [B,H,T] -> (o [B,H,T,dv] contiguous, final state [B,H,dk,dv]).

    Per chunk of C tokens (gamma = cumsum g inside the chunk, D[r,s] = exp(gamma_r - gamma_s) for
    s <= r, 0 above): T^-1 = (I + strict_lower(diag(beta) K K^T * D))^-1, u = T^-1 diag(beta) V,
    w = T^-1 diag(beta exp(gamma)) K. With S_n the state entering chunk n:
        v_new = u - w S_n,   o = diag(exp(gamma)) Q S_n + (Q K^T * D) v_new,
        S_{n+1} = exp(gamma_C) S_n + K_tail^T v_new = A_n S_n + B_n,
        A_n = exp(gamma_C) I - K_tail^T w,  B_n = K_tail^T u,  K_tail = diag(exp(gamma_C - gamma)) K.
    Everything except S_{n+1} = A_n S_n + B_n (one batched matmul per chunk) is computed for all
    chunks at once."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    dt = _compute_dtype(q)
    C = max(1, min(chunk_size, T))
    pad = (C - T % C) % C
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    if pad:  # zero padding at the end changes nothing (k = v = beta = 0, g = 0)
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    BH = B * H
    q, k, v = (x.reshape(BH, N, C, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(BH, N, C), beta.reshape(BH, N, C)

    gamma = g.cumsum(-1)                                               # [BH,N,C]
    eg = gamma.exp()
    upper, eye = _masks(C, dt, q.device)
    decay = (gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()  # D
    kt = k.transpose(-1, -2)
    # the solve reads only the strict lower part (unit diagonal)
    lower = (k @ kt) * (decay * beta.unsqueeze(-1))
    tinv = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False, unitriangular=True)
    tinv = tinv * beta.unsqueeze(-2)                                   # T^-1 diag(beta)
    u = tinv @ v                                                       # [BH,N,C,dv]
    w = tinv @ (k * eg.unsqueeze(-1))                                  # [BH,N,C,dk]
    attn = (q @ kt) * decay                                            # intra-chunk, diagonal included
    qd = q * eg.unsqueeze(-1)
    k_tail = k * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)
    ktt = k_tail.transpose(-1, -2)                                     # [BH,N,dk,C]
    A = torch.matmul(ktt, w).neg_()                                    # [BH,N,dk,dk]
    A.diagonal(dim1=-2, dim2=-1).add_(eg[..., -1:])                    # + exp(gamma_C) I
    Bn = ktt @ u                                                       # [BH,N,dk,dv]

    S = (torch.zeros(BH, dk, dv, dtype=dt, device=q.device) if initial_state is None
         else initial_state.to(dt).reshape(BH, dk, dv))
    states = []
    for n in range(N):
        states.append(S)
        S = torch.baddbmm(Bn[:, n], A[:, n], S)
    S_in = torch.stack(states, dim=1).reshape(BH * N, dk, dv)          # the state entering each chunk
    v_new = torch.baddbmm(u.reshape(BH * N, C, dv), w.reshape(BH * N, C, dk), S_in, alpha=-1.0)
    o = torch.baddbmm(torch.bmm(qd.reshape(BH * N, C, dk), S_in), attn.reshape(BH * N, C, C), v_new)
    o = o.reshape(B, H, N * C, dv)
    if pad:
        o = o[:, :, :T]
    return o, S.reshape(B, H, dk, dv)


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token form; updates ``state`` (fp32 [B,H,dk,dv]) in place and returns o [B,T,H,dv]."""
    dt = state.dtype
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    outs = []
    for t in range(q.shape[1]):
        state.mul_(g[:, t].exp()[..., None, None])                                  # S <- alpha S
        mem = (state * k[:, t].unsqueeze(-1)).sum(-2)                               # S^T k
        delta = (v[:, t] - mem) * beta[:, t].unsqueeze(-1)                          # beta (v - S^T k)
        state.add_(k[:, t].unsqueeze(-1) * delta.unsqueeze(-2))                     # S += k delta^T
        outs.append((state * q[:, t].unsqueeze(-1)).sum(-2))                        # o = S^T q
    return torch.stack(outs, dim=1)
