"""The TAP-PER prefix: P = P_u + P_q (paper eqs. 4-8).

P_u is a row of a user table E in R^{|U| x L*d}. P_q is a projection of the
DIN-attention average of the user's record vectors:

    s_j  = MLP([z_q, z_h, z_q - z_h, z_q * z_h])                  (two Linear + GELU)
    s~_j = s_j - λ_t log(1 + Δt_j) - λ_o log(1 + Δπ_j)           (Δt in days, Δπ order gap)
    α    = softmax over the user's full history (padding masked)
    P_q  = MLP(Σ α_j z_h_j) reshaped to L x d

λ_t, λ_o = softplus(free parameter) so that "decay" cannot become a bonus for
old records. Record vectors are mean token embeddings, whose scale shrinks with
the text's length, so they are scaled to unit RMS before the MLPs; the prefix
is brought back to the token-embedding scale on the way out, so soft tokens
look to the backbone like ordinary tokens in magnitude.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tapper.config import Stage2Config


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class PrefixEncoder(nn.Module):
    def __init__(self, n_users: int, d: int, cfg: Stage2Config, emb_std: float, init_user_table: bool = True):
        super().__init__()
        self.cfg = cfg
        self.L, self.d = cfg.prefix_len, d
        self.register_buffer("emb_std", torch.tensor(float(emb_std)))
        din_h = cfg.din_hidden or d
        proj_h = cfg.proj_hidden or d
        # Row 0 of the table is reserved for users never seen in training (kept at zero):
        # they get P_q only, which is what the P_q-only deployment mode serves.
        # Without P_u (the P_q-only mode) nothing is stored per user: only the unknown row exists.
        rows = (n_users if cfg.use_pu else 0) + 1
        if init_user_table:
            self.user_table = nn.Embedding(rows, self.L * d)
            nn.init.normal_(self.user_table.weight, std=cfg.user_init_std)
            with torch.no_grad():
                self.user_table.weight[0].zero_()
        else:
            # Loading overwrites every row: drawing them at random first (twice, nn.Embedding's own init and
            # ours) took seconds at 100k users. _weight skips nn.Embedding's init.
            self.user_table = nn.Embedding(rows, self.L * d, _weight=torch.empty(rows, self.L * d))
        self.din = nn.Sequential(nn.Linear(4 * d, din_h), nn.GELU(), nn.Linear(din_h, 1))
        self.proj = nn.Sequential(nn.Linear(d, proj_h), nn.GELU(), nn.Linear(proj_h, self.L * d))
        init = _inverse_softplus(cfg.lambda_init)
        self.lambda_t_raw = nn.Parameter(torch.tensor(init))
        self.lambda_o_raw = nn.Parameter(torch.tensor(init))

    @property
    def lambda_t(self) -> torch.Tensor:
        return F.softplus(self.lambda_t_raw) if self.cfg.use_lambda_t else self.lambda_t_raw.new_zeros(())

    @property
    def lambda_o(self) -> torch.Tensor:
        return F.softplus(self.lambda_o_raw) if self.cfg.use_lambda_o else self.lambda_o_raw.new_zeros(())

    def per_user_params(self) -> int:
        return self.L * self.d

    @staticmethod
    def _unit_rms(z: torch.Tensor) -> torch.Tensor:
        # A mean of many token embeddings shrinks toward zero (≈ std/√n per dim), and the
        # few tokens that carry the answer shrink with it; unit RMS keeps the MLP inputs O(1).
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-12)

    def attention(self, zq, zh, mask, dt, dpi) -> torch.Tensor:
        """α [B, N] over each user's history; zero rows for empty histories."""
        h = self._unit_rms(zh)
        q = self._unit_rms(zq).unsqueeze(1).expand_as(h)
        s = self.din(torch.cat([q, h, q - h, q * h], dim=-1)).squeeze(-1)
        b = self.cfg.din_score_bound
        if b is not None:
            s = b * torch.tanh(s / b)
        s = s - self.lambda_t * torch.log1p(dt) - self.lambda_o * torch.log1p(dpi)
        s = s.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(s, dim=-1)
        # A user with no history yet: softmax of all -inf is NaN; no record, no weight.
        return torch.nan_to_num(alpha, nan=0.0)

    def forward(self, user_rows, zq, zh, mask, dt, dpi):
        """Returns (P [B, L, d] on the token-embedding scale, α [B, N])."""
        B = user_rows.shape[0]
        P = zq.new_zeros(B, self.L, self.d)
        alpha = zq.new_zeros(B, zh.shape[1])
        if self.cfg.use_pq and zh.shape[1] > 0:
            alpha = self.attention(zq, zh, mask, dt, dpi)
            pooled = torch.einsum("bn,bnd->bd", alpha, self._unit_rms(zh))
            P = P + self.proj(pooled).view(B, self.L, self.d)
        if self.cfg.use_pu:
            P = P + self.user_table(user_rows).view(B, self.L, self.d)
        return P * self.emb_std, alpha
