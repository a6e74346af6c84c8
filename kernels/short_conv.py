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
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    # the padded input [B, T+K-1, C] built once in compute precision (one pass over x)
    xp = x.new_empty(B, T + K - 1, C, dtype=cd)
    if state is None:
        xp[:, :K - 1].zero_()
    else:
        xp[:, :K - 1].copy_(state.transpose(1, 2).to(x.dtype))
    xp[:, K - 1:].copy_(x)
    w = weight.to(cd)
    y = xp[:, 0:T] * w[:, 0]
    for j in range(1, K):
        y.addcmul_(xp[:, j:j + T], w[:, j])
    y = torch.nn.functional.silu(y).to(x.dtype)
    new_state = xp[:, T:].transpose(1, 2).to(x.dtype)
    return y, new_state
