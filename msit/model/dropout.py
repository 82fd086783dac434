"""Dropout whose mask costs less to draw on the CPU.

torch's CPU dropout draws one random number per element (`bernoulli_`); on the history tokens
(B x N x d) that was the largest single cost of a training step. This one cuts each 64-bit random
number into four 16-bit ones, so an element is dropped with probability round(p * 65536) / 65536 (0.1
becomes 0.100006); the kept ones are scaled by 1 / (1 - p) as usual. Seeded by torch's generator like
everything else. On other devices it is torch's own dropout, already cheap there.
"""

from __future__ import annotations

import torch
from torch import nn

_INT16_MIN = -(2**15)


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        n = x.numel()
        draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
        keep = draws.view(x.shape) >= _INT16_MIN + round(self.p * 2**16)
        return x * (keep * (1 / (1 - self.p))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"
