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
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
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
            raise LoraTargetError(f"LoRA target(s) {missing} matched no module in block {idx}; got {sorted(blocks[idx])}")


def merge_lora(peft_model) -> torch.nn.Module:
    """Merge and unload, refusing to hand on a backbone with NaN/inf weights."""
    merged = peft_model.merge_and_unload()
    for name, p in merged.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"merged backbone has non-finite values in {name}")
    return merged
