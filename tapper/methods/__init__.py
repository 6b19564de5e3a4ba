"""Every method `tapper experiment --variants` and the pipelines evaluate, in one registry.

One module per family, each listing its `METHODS`; they are collected here, explicitly, in the order
`tapper experiment` reports them. All run on the same Stage-1 merged backbone and split and return a
`VariantResult` (tapper.methods.result):

    base                 the merged backbone alone (tapper.methods.base)
    tap-per, ablations   one Stage-2 model and its switches (tapper.methods.tap_per)
    rag-kN, pag-kN       history or a written profile in the prompt (tapper.methods.rag, .pag; .prompted)
    oppu, oppu-rag/-pag  one LoRA per user (tapper.methods.oppu)
    ref-*                reference readouts of the history: yardsticks, not methods (tapper.methods.readout)
"""

from __future__ import annotations

from tapper.methods import base, oppu, pag, rag, readout, tap_per
from tapper.methods.registry import Method, Registry

REGISTRY = Registry([*base.METHODS, *tap_per.METHODS, *rag.METHODS, *pag.METHODS, *oppu.METHODS, *readout.METHODS])


def get(variant: str) -> Method:
    return REGISTRY.get(variant)


def check_variants(names: list[str]) -> None:
    REGISTRY.check(names)


def is_tap_per(variant: str) -> bool:
    """Whether `variant` is a TAP-PER model (a trained prefix state), as opposed to a baseline."""
    method = REGISTRY.find(variant)
    return method is not None and method.family == "tap-per"
