"""A method `tapper experiment --variants` can evaluate: its name (or name pattern), family and runner.

Every method runs as `run(variant, stage1_dir, data, cfg, out_dir, progress, log)` on the same Stage-1 merged
backbone and split, and returns a `VariantResult` (tapper.methods.result). The list of methods is written out
in tapper/methods/__init__.py, one module per family; nothing registers itself at import time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

Runner = Callable[..., "object"]  # (variant, stage1_dir, data, cfg, out_dir, progress, log) -> VariantResult


@dataclass(frozen=True)
class Method:
    name: str  # an exact name ("oppu"), or the display form of a pattern ("rag-kN")
    family: str  # base | tap-per | rag | pag | oppu | reference
    summary: str  # one line for --help and error messages
    run: Runner
    pattern: str | None = None  # a regular expression over variant names, for parametrized families

    def matches(self, variant: str) -> bool:
        return variant == self.name if self.pattern is None else re.fullmatch(self.pattern, variant) is not None


class Registry:
    """The methods, in the order `known()` lists them; exact names win over patterns."""

    def __init__(self, methods: Iterable[Method]):
        self.methods = tuple(methods)
        names = [m.name for m in self.methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"methods registered twice: {dupes}")

    def find(self, variant: str) -> Method | None:
        exact = [m for m in self.methods if m.pattern is None and m.matches(variant)]
        return exact[0] if exact else next((m for m in self.methods if m.pattern and m.matches(variant)), None)

    def get(self, variant: str) -> Method:
        method = self.find(variant)
        if method is None:
            raise ValueError(f"unknown variant {variant!r}; known: {', '.join(self.known())}")
        return method

    def check(self, variants: Iterable[str]) -> None:
        bad = [v for v in variants if self.find(v) is None]
        if bad:
            raise ValueError(f"unknown variant(s) {bad}; known: {', '.join(self.known())}")

    def known(self) -> list[str]:
        return [m.name for m in self.methods]

    def family(self, variant: str) -> str:
        return self.get(variant).family
