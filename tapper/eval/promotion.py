"""The promotion gate: does a candidate's primary metric beat production's, on the same evaluation queries?

Pure functions over two scores and their paired comparison (tapper.eval.paired); the workflow's `promote` step
(steps/promote.py) asks them, records the decision and moves the stage and aliases.
"""

from __future__ import annotations


def is_better(new: float, old: float, higher_is_better: bool) -> bool:
    return new > old if higher_is_better else new < old


# `promote_if`, the pipeline parameter: "better" (the default) promotes a strictly better primary metric;
# "significantly-better" also needs the paired 95 % interval of candidate - production to exclude no change.
PROMOTE_IF = ("better", "significantly-better")


def passes_gate(
    new: float, old: float, higher_is_better: bool, paired: dict | None, promote_if: str
) -> tuple[bool, str]:
    """(promote?, why not) for a candidate scoring `new` against production's `old`."""
    if promote_if not in PROMOTE_IF:
        raise ValueError(f"promote_if must be one of {list(PROMOTE_IF)}, got {promote_if!r}")
    if not is_better(new, old, higher_is_better):
        return False, "does not beat"
    if promote_if == "better":
        return True, ""
    if paired is None:
        return (
            False,
            "beats, but cannot be paired with (no per-query scores for both), so is not significantly better than",
        )
    lo, hi = paired["ci95"]
    if (lo > 0) if higher_is_better else (hi < 0):
        return True, ""
    return False, "beats, but its paired 95 % interval includes no change, so is not significantly better than"
