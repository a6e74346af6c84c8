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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, initial_state: torch.Tensor | None = None,
                           chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY / UT-transform) form of the gated delta rule. Returns (o [B,T,H,dv], final state)."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    dt = _compute_dtype(q)
    C = chunk_size
    pad = (C - T % C) % C
    # -> [B, H, T, d] in compute precision; zero padding at the end changes nothing (k = v = beta = 0, g = 0)
    q, k, v = (torch.nn.functional.pad(x.to(dt).transpose(1, 2), (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (torch.nn.functional.pad(x.to(dt).transpose(1, 2), (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(B, H, N, C), beta.reshape(B, H, N, C)

    gamma = g.cumsum(-1)                                               # [B,H,N,C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = gamma.unsqueeze(-1) - gamma.unsqueeze(-2)                   # gamma_r - gamma_s
    decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()  # D (diag = 1)
    kb = k * beta.unsqueeze(-1)
    lower = (kb @ k.transpose(-1, -2)) * decay                        # solve uses only the strict lower part
    u = torch.linalg.solve_triangular(lower, v * beta.unsqueeze(-1), upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(lower, kb * gamma.exp().unsqueeze(-1), upper=False,
                                      unitriangular=True)
    qd = q * gamma.exp().unsqueeze(-1)
    attn = (q @ k.transpose(-1, -2)) * decay                           # intra-chunk, diagonal included
    k_tail = k * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)
    chunk_decay = gamma[..., -1].exp()[..., None, None]                # [B,H,N,1,1]

    S = (torch.zeros(B, H, dk, dv, dtype=dt, device=q.device) if initial_state is None
         else initial_state.to(dt))
    outs = []
    for n in range(N):
        v_new = u[:, :, n] - w[:, :, n] @ S
        outs.append(qd[:, :, n] @ S + attn[:, :, n] @ v_new)
        S = S * chunk_decay[:, :, n] + k_tail[:, :, n].transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, dv)[:, :, :T]
    return o.transpose(1, 2), S


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
