"""LoRA helpers shared by Stage 1 (task LoRA, merged) and Stage 2 (bridge LoRA, kept).

PEFT silently drops target names that match nothing (the authors' `out_proj`
never touched Llama's `o_proj`), so every attach checks that each configured
target became a LoRA layer in every transformer block.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

_BLOCK = re.compile(r"\.layers\.(\d+)\.")


class LoraTargetError(RuntimeError):
    pass


def attach_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: list[str]):
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, cfg)
    assert_targets_matched(peft_model, targets)
    return peft_model


def assert_targets_matched(model: torch.nn.Module, targets: list[str]) -> None:
    blocks: dict[int, set[str]] = {}
    for name, module in model.named_modules():
        m = _BLOCK.search(name + ".")
        if m is None:
            continue
        blocks.setdefault(int(m.group(1)), set())
        if isinstance(module, LoraLayer):
            blocks[int(m.group(1))].add(name.rsplit(".", 1)[-1])
    if not blocks:
        raise LoraTargetError("no transformer blocks (`.layers.N.`) found in the model")
    for idx in sorted(blocks):
        missing = sorted(set(targets) - blocks[idx])
        if missing:
            raise LoraTargetError(
                f"LoRA target(s) {missing} matched no module in block {idx}; got {sorted(blocks[idx])}"
            )


def merge_lora(peft_model) -> torch.nn.Module:
    """Merge and unload, refusing to hand on a backbone with NaN/inf weights."""
    merged = peft_model.merge_and_unload()
    for name, p in merged.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"merged backbone has non-finite values in {name}")
    return merged


class PositionScope:
    """Restricts every LoRA of a model to some sequence positions (the others see the base weights only).

    Used for a bridge that may change how the soft tokens are read (their keys, values and their own
    residual stream, layer by layer) but not how the prompt itself is processed: a bridge on every position
    can also learn the training prompts' answers by heart, which a bridge on the prefix positions cannot.
    `positions` is a bool tensor [B, T] or [T] set before each forward; None means no position (decode
    steps of generation, which only add prompt tokens)."""

    def __init__(self, model: torch.nn.Module):
        self.positions: torch.Tensor | None = None
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                for b in module.lora_B.values():
                    self._handles.append(b.register_forward_hook(self._mask))
        if not self._handles:
            raise LoraTargetError("no LoRA layer to restrict")

    def _mask(self, module, inputs, output):
        if self.positions is None:
            return output * 0.0
        m = self.positions.to(output.dtype)
        return output * (m.unsqueeze(-1) if m.dim() == 2 else m.view(1, -1, 1))
