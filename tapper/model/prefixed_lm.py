"""A causal LM that reads L soft tokens in front of the prompt.

One class serves every variant: the Stage-1 model (LoRA being trained, no
prefix), the non-personalized base (merged backbone, no prefix), and TAP-PER
(merged backbone + bridge LoRA + prefix). Soft tokens go in through
`inputs_embeds` with the attention mask extended (paper 2.2); the loss is the
cross-entropy of the target tokens only.

The sequence layout is `[pad…] [P_1..P_L] [prompt] [target] [pad…]` with
explicit position ids that start at the first real (non-pad) slot, so left
padding (generation) and right padding (training) see the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LMBatch:
    """Token-level part of a batch. `prefix` [B, L, d] or None; ids right- or left-padded."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor | None = None  # [B, T], -100 where no loss


class PrefixedLM(nn.Module):
    def __init__(self, causal_lm: nn.Module, scope=None):
        super().__init__()
        self.lm = causal_lm
        # A tapper.model.lora.PositionScope: the bridge acts on the soft-token positions only.
        self.scope = scope
        # PEFT injects LoRA layers in place, so these stay valid after attaching adapters.
        base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        self.decoder = base.model
        self.lm_head = base.lm_head
        self.embed = base.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def _inputs(self, batch: LMBatch, prefix: torch.Tensor | None):
        # Batches are built on the CPU; the model may live on a GPU.
        embeds = self.embed(batch.input_ids.to(self.device))
        mask = batch.attention_mask.to(self.device)
        if prefix is not None:
            B, L, _ = prefix.shape
            embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
            mask = torch.cat([mask.new_ones(B, L), mask], dim=1)
        if self.scope is not None:
            L = 0 if prefix is None else prefix.shape[1]
            self.scope.positions = torch.arange(embeds.shape[1], device=embeds.device) < L
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, positions

    def loss(self, batch: LMBatch, prefix: torch.Tensor | None = None) -> torch.Tensor:
        embeds, mask, positions = self._inputs(batch, prefix)
        hidden = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state
        labels = batch.labels.to(self.device)
        if prefix is not None:
            labels = torch.cat([labels.new_full((labels.shape[0], prefix.shape[1]), -100), labels], dim=1)
        # Predict token t+1 from position t; only target positions need the vocab projection.
        h, y = hidden[:, :-1], labels[:, 1:]
        keep = y != -100
        logits = self.lm_head(h[keep])
        return F.cross_entropy(logits.float(), y[keep])

    @torch.no_grad()
    def generate(
        self, batch: LMBatch, prefix: torch.Tensor | None, max_new_tokens: int, eos_id: int
    ) -> list[list[int]]:
        """Greedy decoding with a KV cache; `batch` must be left-padded."""
        embeds, mask, positions = self._inputs(batch, prefix)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        past = out.past_key_values
        next_pos = positions[:, -1:] + 1
        B = embeds.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=embeds.device)
        generated: list[list[int]] = [[] for _ in range(B)]
        logits = self.lm_head(out.last_hidden_state[:, -1])
        steps = []
        for _ in range(max_new_tokens):
            tok = logits.argmax(-1)
            # Tokens stay on the device; finished rows are read back once, after the loop (no sync per token,
            # but one per step for the stop test).
            steps.append(tok)
            done = done | (tok == eos_id)
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            if self.scope is not None:
                self.scope.positions = None
            out = self.decoder(
                inputs_embeds=self.embed(tok[:, None]),
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            next_pos = next_pos + 1
            logits = self.lm_head(out.last_hidden_state[:, -1])
        if steps:
            for i, row in enumerate(torch.stack(steps, 1).tolist()):
                generated[i] = row[: row.index(eos_id)] if eos_id in row else row
        return generated
