"""Activation memory of one training step, counted on the meta device.

The real forward (decoder, LoRA layers, prefix encoder, head and loss) runs on meta tensors of the batch's
shape: nothing is computed or allocated, but every tensor autograd saves for the backward passes through
`saved_tensors_hooks`, with its shape and dtype. Counting those (one count per storage, parameters
excluded) is the activation memory the backward will need, without a formula typed by hand per
architecture. Each saved tensor is attributed to the transformer block running when it was saved, so the
checkpointed variant follows: a checkpointed block keeps only its input until the backward recomputes it.

Two things the meta device does not do as a GPU does, corrected here and said so:
- attention: meta runs the math path of scaled-dot-product attention (saving the [B, H, T, T] probabilities);
  a GPU (and torch's CPU kernel) runs a fused kernel that saves q, k, v, the output and a log-sum-exp.
  `fused_attention` stands in for the fused kernel with exactly that saved set.
- transformers checks some mask properties with data-dependent Python branches (`.all()`), which meta tensors
  cannot answer: the plan runs without a padding mask (causal attention only) and tells transformers the
  sequences are not packed (tapper never packs). A padding mask adds B·T² bytes, counted by plan.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SavedBytes:
    per_layer: list[int] = field(default_factory=list)  # bytes saved inside each transformer block
    layer_inputs: list[int] = field(default_factory=list)  # bytes of each block's input (what checkpointing keeps)
    outside: int = 0  # bytes saved outside the blocks (prefix encoder, embeddings, final norm, head, loss)
    largest: int = 0  # the largest single saved tensor (its gradient exists at once in the backward)

    def total(self, checkpointing: bool) -> int:
        """Bytes kept from the forward to the backward. A checkpointed block keeps only its input; its own
        activations come back one block at a time in the backward (plan.py's workspace)."""
        if checkpointing:
            return self.outside + sum(self.layer_inputs)
        return self.outside + sum(self.per_layer)

    def workspace(self, checkpointing: bool) -> int:
        """The backward's working set on top of what was kept: the loss's fp32 logits' gradient next to the logits
        (twice the largest tensor); with checkpointing, or one recomputed block's activations, whichever is larger
        (the logits are freed before the first block is recomputed)."""
        logits = 2 * self.largest
        return max(logits, max(self.per_layer, default=0)) if checkpointing else logits


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for its backward: q, k, v, the output, the log-sum-exp [B, H, T]."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the plan never runs a backward
        raise NotImplementedError


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def fused_attention():
    """Scaled-dot-product attention as a fused kernel's memory (module doc); transformers' pack detection off."""
    import transformers.masking_utils as masking

    sdpa, packed = F.scaled_dot_product_attention, masking.find_packed_sequence_indices
    F.scaled_dot_product_attention = _fused_sdpa
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        masking.find_packed_sequence_indices = packed


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def count_saved(model: torch.nn.Module, layers: torch.nn.ModuleList, run) -> SavedBytes:
    """Run `run()` (a forward on meta tensors) and count what autograd saves, per block of `layers`."""
    params = {_key(p) for p in model.parameters()} | {_key(b) for b in model.buffers()}
    seen: set[int] = set()
    out = SavedBytes(per_layer=[0] * len(layers), layer_inputs=[0] * len(layers))
    current: list[int | None] = [None]

    def pack(t: torch.Tensor):
        k = _key(t)
        if k not in params and k not in seen:
            seen.add(k)
            n = t.untyped_storage().nbytes()
            out.largest = max(out.largest, n)
            if current[0] is None:
                out.outside += n
            else:
                out.per_layer[current[0]] += n
        return t

    handles = []
    for i, layer in enumerate(layers):

        def pre(module, args, kwargs, i=i):
            current[0] = i
            hidden = args[0] if args else kwargs.get("hidden_states")
            out.layer_inputs[i] = hidden.untyped_storage().nbytes()

        def post(module, args, kwargs, output):
            current[0] = None

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in handles:
            h.remove()
    return out
