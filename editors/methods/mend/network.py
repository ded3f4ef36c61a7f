"""The MEND hypernetwork: running input/gradient normalisation and the low-rank blocks that map gradient factors
to weight updates."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class _RunningNorm(torch.nn.Module):
    """Per-layer running mean and variance of the inputs (Chan et al.'s parallel update), used to standardise them."""

    count: torch.Tensor  # buffers, registered in __init__
    mean: torch.Tensor
    m2: torch.Tensor

    def __init__(self, n_layers: int, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(n_layers, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_layers, dim))
        self.register_buffer("m2", torch.zeros(n_layers, dim))

    @torch.no_grad()
    def update(self, layer: int, x: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        x = x.float()
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        count = float(self.count[layer])
        total = count + n
        diff = batch_mean - self.mean[layer]
        self.mean[layer] += diff * (n / total)
        self.m2[layer] += batch_m2 + diff ** 2 * (count * n / total)
        self.count[layer] = total

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        count = float(self.count[layer])
        if count < 2:
            return x
        std = (self.m2[layer] / (count - 1)).clamp_min(0).sqrt()
        return (x - self.mean[layer]) / (std + 1e-6)


class _Block(torch.nn.Module):
    """``z + A silu(s_l * (B z) + o_l)``: a low-rank residual MLP block conditioned on the edited layer ``l``."""

    def __init__(self, dim: int, rank: int, n_layers: int):
        super().__init__()
        self.down = torch.nn.Linear(dim, rank)
        self.up = torch.nn.Linear(rank, dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)
        self.scale = torch.nn.Parameter(torch.ones(n_layers, rank))
        self.shift = torch.nn.Parameter(torch.zeros(n_layers, rank))

    def forward(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(F.silu(self.down(z) * self.scale[layer] + self.shift[layer]))


class MENDNet(torch.nn.Module):
    """The gradient transform ``g`` for weights with input width ``d_in`` and output width ``d_out``.

    ``forward(i, u, delta)`` maps token factors of the ``i``-th edited layer, ``u`` (N, d_in) and ``delta``
    (N, d_out), to ``(u~, delta~)``; :attr:`edit_lr` holds ``alpha`` per edited layer.
    """

    def __init__(self, d_in: int, d_out: int, n_layers: int, rank: int, n_blocks: int, init_edit_lr: float):
        super().__init__()
        self.d_in, self.d_out, self.n_layers = d_in, d_out, n_layers
        dim = d_in + d_out
        self.norm = _RunningNorm(n_layers, dim)
        self.blocks = torch.nn.ModuleList(_Block(dim, rank, n_layers) for _ in range(n_blocks))
        self.log_edit_lr = torch.nn.Parameter(torch.full((n_layers,), math.log(init_edit_lr)))

    @property
    def edit_lr(self) -> torch.Tensor:
        return self.log_edit_lr.exp()

    def forward(self, layer: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u.float(), delta.float()], dim=-1)
        if self.training:
            self.norm.update(layer, z)
        z = self.norm(layer, z)
        for block in self.blocks:
            z = block(layer, z)
        return z[:, :self.d_in], z[:, self.d_in:]
