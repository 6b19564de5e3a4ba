"""Materializers for the online-adaptation trajectories and the comparison report (JSON / Markdown / PNG).

Both show in the ZenML dashboard: the trajectories as the Figure-6-style plot and a Markdown table,
the comparison report as Markdown (its plots inlined) and one image per plot.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any, ClassVar, Dict, Tuple, Type

from zenml.enums import ArtifactType, VisualizationType
from zenml.materializers.base_materializer import BaseMaterializer

from materializers._io import md_table, read_json, write_json, write_text
from materializers.types import ComparisonReport, OnlineTrajectories

TRAJECTORIES, PLOT, REPORT, METRICS, IMAGES = "trajectories.json", "online.png", "report.md", "metrics.json", "images"


def _write_bytes(store, path: str, data: bytes) -> None:
    with store.open(path, "wb") as f:
        f.write(data)


def _read_bytes(store, path: str) -> bytes:
    with store.open(path, "rb") as f:
        return f.read()


class OnlineTrajectoriesMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (OnlineTrajectories,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save(self, data: OnlineTrajectories) -> None:
        write_json(self.artifact_store, os.path.join(self.uri, TRAJECTORIES), data.report)
        if data.png:
            _write_bytes(self.artifact_store, os.path.join(self.uri, PLOT), data.png)

    def load(self, data_type: Type[Any]) -> OnlineTrajectories:
        report = read_json(self.artifact_store, os.path.join(self.uri, TRAJECTORIES))
        png_path = os.path.join(self.uri, PLOT)
        png = _read_bytes(self.artifact_store, png_path) if self.artifact_store.exists(png_path) else b""
        return OnlineTrajectories(report=report, png=png)

    def extract_metadata(self, data: OnlineTrajectories) -> Dict[str, Any]:
        r = data.report
        out: Dict[str, Any] = {"metric": r["metric"], "fractions": r["fractions"], "task": r.get("task", "")}
        for m, ys in r["methods"].items():
            out[f"{m}/final"] = float(ys[-1])
            out[f"{m}/params_touched_per_chunk"] = int(r["cost"][m]["params_touched_per_chunk"])
            out[f"{m}/seconds_per_chunk"] = float(r["cost"][m]["seconds_per_chunk"])
        if "final_gap_full_retrain_minus_online_full" in r:
            out["final_gap_full_retrain_minus_online_full"] = float(r["final_gap_full_retrain_minus_online_full"])
        return out

    def save_visualizations(self, data: OnlineTrajectories) -> Dict[str, VisualizationType]:
        r = data.report
        out: Dict[str, VisualizationType] = {}
        if data.png:
            out[os.path.join(self.uri, PLOT)] = VisualizationType.IMAGE
        head = ["method", *(f"{100 * f:.0f}%" for f in r["fractions"]), "params/chunk", "s/chunk"]
        rows = [
            [
                m,
                *(float(y) for y in ys),
                f"{r['cost'][m]['params_touched_per_chunk']:,}",
                float(r["cost"][m]["seconds_per_chunk"]),
            ]
            for m, ys in r["methods"].items()
        ]
        text = f"# {r.get('task', '')} online adaptation: {r['metric']} by history absorbed\n\n" + md_table(head, rows)
        if "final_gap_full_retrain_minus_online_full" in r:
            text += f"\n\nFinal gap Full-Retrain − Online-Full: {r['final_gap_full_retrain_minus_online_full']:+.4f}"
        if "split" in r:
            s = r["split"]
            text += (
                f"\n\n{s.get('users')} users, {s.get('eval_queries')} test queries; bootstrap records "
                f"{s.get('bootstrap_records')}, records per chunk {s.get('chunk_records')}"
            )
        md = os.path.join(self.uri, "trajectories.md")
        write_text(self.artifact_store, md, text)
        out[md] = VisualizationType.MARKDOWN
        return out


class ComparisonReportMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (ComparisonReport,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save(self, data: ComparisonReport) -> None:
        write_text(self.artifact_store, os.path.join(self.uri, REPORT), data.markdown)
        write_json(self.artifact_store, os.path.join(self.uri, METRICS), data.metrics)
        self.artifact_store.makedirs(os.path.join(self.uri, IMAGES))
        for name, png in data.images.items():
            _write_bytes(self.artifact_store, os.path.join(self.uri, IMAGES, name), png)

    def load(self, data_type: Type[Any]) -> ComparisonReport:
        with self.artifact_store.open(os.path.join(self.uri, REPORT), "r") as f:
            markdown = f.read()
        metrics = read_json(self.artifact_store, os.path.join(self.uri, METRICS))
        d = os.path.join(self.uri, IMAGES)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in self.artifact_store.listdir(d)]
        images = {n: _read_bytes(self.artifact_store, os.path.join(d, n)) for n in sorted(names)}
        return ComparisonReport(task=str(metrics.get("task", "")), markdown=markdown, images=images, metrics=metrics)

    def extract_metadata(self, data: ComparisonReport) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "task": data.task,
            "variants": list(data.metrics.get("variants", {})),
            "plots": sorted(data.images),
        }
        for v, ms in data.metrics.get("variants", {}).items():
            for k, x in ms.items():
                out[f"{v}/{k}"] = float(x)
        return out

    def save_visualizations(self, data: ComparisonReport) -> Dict[str, VisualizationType]:
        # The dashboard cannot follow report.md's relative image links: inline the PNGs as data URIs.
        def inline(m: re.Match) -> str:
            png = data.images.get(m.group(2))
            return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(png).decode()})" if png else m.group(0)

        md = os.path.join(self.uri, "report_inline.md")
        write_text(self.artifact_store, md, re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", inline, data.markdown))
        out: Dict[str, VisualizationType] = {md: VisualizationType.MARKDOWN}
        for name in data.images:
            out[os.path.join(self.uri, IMAGES, name)] = VisualizationType.IMAGE
        return out
