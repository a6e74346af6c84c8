"""Short causal depthwise convolution + SiLU (spec §5.2): torch reference op.

x: [B, T, C] pre-conv inputs, weight: [C, K] (tap K-1 multiplies the current token),
state: [B, C, K-1] the previous K-1 inputs, oldest first (zeros for a fresh sequence).
Returns (silu(conv(x)) [B, T, C] in x.dtype, new state [B, C, K-1] in x.dtype).
"""

from __future__ import annotations

import torch


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor,
                       state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, C = x.shape
    K = weight.shape[-1]
    if state is None:
        state = x.new_zeros(B, C, K - 1)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)        # [B, T+K-1, C]
    w = weight.to(cd)
    y = xp[:, 0:T].to(cd) * w[:, 0]
    for j in range(1, K):
        y = y + xp[:, j:j + T].to(cd) * w[:, j]
    y = torch.nn.functional.silu(y).to(x.dtype)
    new_state = xp[:, T:].transpose(1, 2)
    return y, new_state
