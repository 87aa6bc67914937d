"""Mamba (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023).

`Mamba` has mamba_ssm.Mamba's constructor, parameter names, shapes and initialisation, so a state
dict moves between the two unchanged. It runs on any device: the selective scan is
`nnunet_ext.ops.selective_scan_fn`, which uses mamba_ssm's CUDA kernel when one is available, and
the convolution `nnunet_ext.ops.causal_conv1d_silu`; on CPU both run compiled loops where a C
compiler is at hand.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nnunet_ext.ops.causal_conv import causal_conv1d_silu
from nnunet_ext.ops.selective_scan import selective_scan_fn


class Mamba(nn.Module):
    """One Mamba mixer: (batch, length, d_model) -> (batch, length, d_model).

    in_proj splits each token into x and a gate z; x goes through a causal depthwise conv1d and
    SiLU; x_proj gives the data-dependent step dt (through dt_proj and softplus) and B, C; the
    selective scan mixes along the sequence; out_proj maps back to d_model.

    Arguments follow mamba_ssm.Mamba. `use_fast_path` and `layer_idx` are accepted for drop-in
    compatibility (our scan picks the CUDA kernel by itself; there is no inference cache).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path, self.layer_idx = use_fast_path, layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel, stored as log(-A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        for p in (self.A_log, self.D):
            p._no_weight_decay = True  # mamba_ssm's marker for optimisers that honour it
        self._init_dt(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)

    def _init_dt(self, dt_init, dt_scale, dt_min, dt_max, dt_init_floor):
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}.")
        # softplus(bias) is log-uniform in [dt_min, dt_max]; the bias is its inverse softplus.
        dt = torch.exp(torch.rand(self.d_inner, device=self.dt_proj.bias.device)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # mamba_ssm's marker: keep this bias through re-initialisation

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        if inference_params is not None:
            raise NotImplementedError("nnunet_ext's Mamba has no recurrent inference cache; "
                                      "call it on whole sequences (inference_params=None).")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba expects (batch, length, {self.d_model}), got {tuple(hidden_states.shape)}.")
        batch, length, _ = hidden_states.shape
        # Channels first over all tokens, (d, batch * length), as mamba_ssm's fused path lays them out:
        # every projection is one matrix product, and the convolution and the scan read their
        # (batch, d, length) views of it without a transposed copy.
        tokens = hidden_states.reshape(batch * length, self.d_model).t()
        xz = self.in_proj.weight @ tokens
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        x, z = (self._sequences(t, batch) for t in xz.chunk(2))
        x = causal_conv1d_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias)
        x_dbl = self.x_proj.weight @ self._tokens(x)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state])
        delta = self.dt_proj.weight @ dt  # the bias is added inside the scan
        y = selective_scan_fn(x, self._sequences(delta, batch), -torch.exp(self.A_log.float()),
                              self._sequences(B, batch), self._sequences(C, batch), self.D.float(), z=z,
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(self._tokens(y).t()).view(batch, length, -1)  # an identity in LKM-UNet's official BiM

    @staticmethod
    def _sequences(t: torch.Tensor, batch: int) -> torch.Tensor:
        """(d, batch * length) -> a (batch, d, length) view."""
        return t.view(t.shape[0], batch, -1).transpose(0, 1)

    @staticmethod
    def _tokens(t: torch.Tensor) -> torch.Tensor:
        """(batch, d, length) -> (d, batch * length), a view when t is one of `_sequences`."""
        return t.transpose(0, 1).reshape(t.shape[1], -1)
