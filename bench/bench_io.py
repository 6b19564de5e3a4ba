"""What every bench result file holds: the machine it ran on, the command that made it, the results."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from tapper.atomic import atomic_write_json


def write_results(out: Path, script: str, argv: list[str] | None, results: list, **machine) -> Path:
    """Write {"machine", "command", "results"} to `out` (temporary file, then rename) and say where."""
    doc = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            **machine,
        },
        "command": f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }
    atomic_write_json(out, doc)
    print(f"wrote {out}")
    return Path(out)
