"""The TAP-PER prefix: P = P_u + P_q (paper eqs. 4-8).

P_u is a row of a user table E in R^{|U| x L*d}. P_q is a projection of the
DIN-attention average of the user's record vectors:

    s_j  = MLP([z_q, z_h, z_q - z_h, z_q * z_h])                  (two Linear + GELU)
    s~_j = s_j - λ_t log(1 + Δt_j) - λ_o log(1 + Δπ_j)           (Δt in days, Δπ order gap)
    α    = softmax over the user's full history (padding masked)
    P_q  = MLP(Σ α_j z_h_j) reshaped to L x d

λ_t, λ_o = softplus(free parameter) so that "decay" cannot become a bonus for
old records. The prefix is brought to the token-embedding scale on the way
out, so soft tokens look to the backbone like ordinary tokens in magnitude.

How the vectors enter the MLPs (`Stage2Config.input_norm`), a choice the paper
leaves open:
- "unit_rms": each vector scaled to unit RMS. A record vector is a mean of
  token embeddings, and every record shares its field names and function
  words, so two records' vectors have a cosine of ~0.6 and two users' pooled
  histories ~0.98: what tells users apart is ~2 % of the pooled vector's
  energy, which the projection MLP must dig out of a near-constant input.
- "standardize" (default): record and query vectors are centred on the
  training corpus's mean before the unit-RMS scaling, and the pooled history is
  centred and scaled per dimension with statistics of the training histories
  (`fit_input_stats`), so that the part that differs between users reaches the
  MLPs at O(1). The statistics are buffers, saved with the model, so serving
  and online updates see the inputs training saw.

The DIN's output layer starts at zero: α starts uniform, so P_q starts as a
readout of the plain history mean, which already holds the user's preferences;
the attention then learns where to depart from uniform.

An empty history pools to the average training user (zero after
standardization, zero in "unit_rms" mode), and P_q = MLP(that) whether or not
other rows of the batch have histories, so a cold-start user gets the same
prefix alone or batched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tapper.config import Stage2Config


# Buffers fit_input_stats sets (absent from states saved before inputs were standardized).
INPUT_STATS = ("record_mean", "query_mean", "pooled_mean", "pooled_scale")


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
        nn.init.zeros_(self.din[-1].weight)
        nn.init.zeros_(self.din[-1].bias)
        # Input statistics (module doc); identity until fit_input_stats is called.
        self.register_buffer("record_mean", torch.zeros(d))
        self.register_buffer("query_mean", torch.zeros(d))
        self.register_buffer("pooled_mean", torch.zeros(d))
        self.register_buffer("pooled_scale", torch.ones(d))
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

    @property
    def standardized(self) -> bool:
        return self.cfg.input_norm == "standardize"

    def records_in(self, zh: torch.Tensor) -> torch.Tensor:
        return self._unit_rms(zh - self.record_mean if self.standardized else zh)

    def query_in(self, zq: torch.Tensor) -> torch.Tensor:
        return self._unit_rms(zq - self.query_mean if self.standardized else zq)

    @torch.no_grad()
    def fit_input_stats(
        self,
        vectors: torch.Tensor,
        q_rows: list[int],
        hist_rows: list[list[int]],
        dt: list[list[float]] | None = None,
        dpi: list[list[float]] | None = None,
    ) -> None:
        """Set the standardization statistics from the training examples: `vectors` [n, d] holds every text's
        vector, `q_rows` each example's query row, `hist_rows` each example's history rows, `dt`/`dpi` their
        time and order gaps. The pooled statistics are those of the pooling P_q starts with: the DIN scores
        start at zero, so α is the temporal prior alone (uniform when the gaps are not given)."""
        if not self.standardized:
            return
        records = sorted({r for rows in hist_rows for r in rows})
        if records:
            self.record_mean.copy_(vectors[records].float().mean(0))
        if q_rows:
            self.query_mean.copy_(vectors[q_rows].float().mean(0))
        normed = self.records_in(vectors.float().to(self.record_mean.device))
        total = torch.zeros_like(self.pooled_mean, dtype=torch.float64)
        squares = torch.zeros_like(total)
        n = 0
        for k, rows in enumerate(hist_rows):
            if not rows:
                continue
            prior = torch.zeros(len(rows))
            if dt is not None and dpi is not None:
                prior = -(
                    self.lambda_t.detach().cpu() * torch.log1p(torch.tensor(dt[k]))
                    + self.lambda_o.detach().cpu() * torch.log1p(torch.tensor(dpi[k]))
                )
            alpha = torch.softmax(prior.double(), 0).to(normed.device)
            v = (alpha.unsqueeze(1) * normed[rows].double()).sum(0)
            total += v
            squares += v * v
            n += 1
        if n < 2:
            return
        mean = total / n
        var = (squares / n - mean * mean).clamp(min=0) * n / (n - 1)
        self.pooled_mean.copy_(mean.float())
        self.pooled_scale.copy_(var.sqrt().float().clamp(min=1e-4))

    def attention(self, zq, zh, mask, dt, dpi) -> torch.Tensor:
        """α [B, N] over each user's history; zero rows for empty histories."""
        h = self.records_in(zh)
        q = self.query_in(zq).unsqueeze(1)
        # din[0] applied to [q, h, q - h, q * h] without building that [B, N, 4d] tensor: its weight's four
        # blocks act on q once per query, on h, and on q * h.
        first, rest = self.din[0], self.din[1:]
        w_q, w_h, w_d, w_p = first.weight.split(self.d, dim=1)
        hidden = q @ (w_q + w_d).T + h @ (w_h - w_d).T + (q * h) @ w_p.T + first.bias
        s = rest(hidden).squeeze(-1)
        b = self.cfg.din_score_bound
        if b is not None:
            s = b * torch.tanh(s / b)
        s = s - self.lambda_t * torch.log1p(dt) - self.lambda_o * torch.log1p(dpi)
        s = s.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(s, dim=-1)
        # A user with no history yet: softmax of all -inf is NaN; no record, no weight.
        return torch.nan_to_num(alpha, nan=0.0)

    def pooled(self, alpha: torch.Tensor, zh: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention-pooled history as the projection reads it; an empty history is the average user."""
        if zh.shape[1] == 0:
            return zh.new_zeros(zh.shape[0], self.d)
        pooled = torch.einsum("bn,bnd->bd", alpha, self.records_in(zh))
        if self.standardized:
            pooled = (pooled - self.pooled_mean) / self.pooled_scale
        return pooled * mask.any(-1, keepdim=True).to(pooled.dtype)

    @staticmethod
    def _drop_records(mask: torch.Tensor, p: float) -> torch.Tensor:
        """Training only: each history record is hidden with probability p (a non-empty history keeps at least
        one), so P_q sees a different subset of the same history at every epoch."""
        keep = mask & (torch.rand(mask.shape, device=mask.device) >= p)
        lost = mask.any(-1) & ~keep.any(-1)
        if lost.any():
            # The latest record of a history that lost every record stays.
            last = (mask.long().cumsum(-1) == mask.long().sum(-1, keepdim=True)) & mask
            keep = keep | (last & lost.unsqueeze(-1))
        return keep

    def forward(self, user_rows, zq, zh, mask, dt, dpi):
        """Returns (P [B, L, d] on the token-embedding scale, α [B, N])."""
        B = user_rows.shape[0]
        P = zq.new_zeros(B, self.L, self.d)
        alpha = zq.new_zeros(B, zh.shape[1])
        if self.cfg.use_pq:
            if self.training and self.cfg.history_dropout > 0 and zh.shape[1] > 0:
                mask = self._drop_records(mask, self.cfg.history_dropout)
            if zh.shape[1] > 0:
                alpha = self.attention(zq, zh, mask, dt, dpi)
            pooled = self.pooled(alpha, zh, mask)
            # Kept for an auxiliary objective on what P_q read (tapper.train.stage2.AnswerReadout).
            self.last_pooled = pooled
            P = P + self.proj(pooled).view(B, self.L, self.d)
        if self.cfg.use_pu:
            P = P + self.user_table(user_rows).view(B, self.L, self.d)
        return P * self.emb_std, alpha
