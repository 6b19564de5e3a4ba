"""Backbone precision and activation checkpointing (the `dtype` and `gradient_checkpointing` settings).

The scheme is "low-precision frozen backbone, fp32 master weights": the backbone's own weights are stored in
bf16 (or fp16) and never updated in Stage 2, so rounding them costs nothing but their precision; what trains
(the LoRAs, the prefix encoder, the user table) is created and kept in fp32, with fp32 optimizer state, so that
small updates are not rounded away. PEFT keeps adapter weights in fp32 on a bf16/fp16 base by itself
(`autocast_adapter_dtype`), casting its input up and its output down; the prefix is computed in fp32 and cast
to the backbone's dtype where it joins the token embeddings (tapper.model.prefixed_lm); the loss is taken on
fp32 logits. fp16 has a narrow exponent range, so its gradients are loss-scaled (tapper.train.loop).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}") from None


def needs_loss_scaling(name: str) -> bool:
    return name == "fp16"


def cast_backbone(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Cast the frozen backbone's floating-point weights and buffers to `name` (in place; no-op if already)."""
    dtype = torch_dtype(name)
    if next(model.parameters()).dtype != dtype:
        model.to(dtype)
    return model


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Recompute each transformer block in the backward pass (HF's own per-layer checkpointing).

    Non-reentrant: it needs no input that requires grad (Stage 1's inputs are frozen token embeddings) and
    it lets the prefix's gradient reach the soft tokens through recomputed blocks. Active in train mode only,
    so generation is unaffected."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    # transformers 5.x renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn).
    if hasattr(base, "activation_checkpointing_enable"):
        if on:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif base.is_activation_checkpointing:
            base.activation_checkpointing_disable()
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()
