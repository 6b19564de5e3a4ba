"""Materializers for evaluation results and promotion decisions (JSON, with tables and plots)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, ClassVar, Dict, Tuple, Type

from zenml.enums import ArtifactType, VisualizationType
from zenml.materializers.base_materializer import BaseMaterializer

from materializers._io import html_table, md_table, read_json, write_json, write_text
from materializers.types import EvalReport, PromotionDecision, VariantResult

DATA = "data.json"


class _JsonDataclassMixin:
    """save/load of a dataclass as data.json (mixed into the materializers below)."""

    def save(self, data: Any) -> None:
        write_json(self.artifact_store, os.path.join(self.uri, DATA), asdict(data))

    def load(self, data_type: Type[Any]) -> Any:
        return data_type(**read_json(self.artifact_store, os.path.join(self.uri, DATA)))


class VariantResultMaterializer(_JsonDataclassMixin, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (VariantResult,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save(self, data: VariantResult) -> None:
        super().save(data)
        # The predictions also in LaMP's format, so LaMP's own evaluator can read the artifact.
        write_json(
            self.artifact_store,
            os.path.join(self.uri, "predictions.json"),
            {"task": data.task, "golds": [{"id": k, "output": v} for k, v in data.predictions.items()]},
        )

    def extract_metadata(self, data: VariantResult) -> Dict[str, Any]:
        return {
            **{f"metric/{k}": float(v) for k, v in data.metrics.items()},
            "variant": data.name,
            "predictions": len(data.predictions),
            "per_user_params": data.per_user_params,
            "shared_params": data.shared_params,
            "seconds": round(data.seconds, 2),
        }

    def save_visualizations(self, data: VariantResult) -> Dict[str, VisualizationType]:
        text = f"# {data.name} on {data.task}\n\n" + md_table(
            ["metric", "value"], [[k, float(v)] for k, v in data.metrics.items()]
        )
        sample = list(data.predictions.items())[:10]
        text += "\n\n## First predictions\n\n" + md_table(
            ["id", "prediction"], [[k, v.replace("|", "/")] for k, v in sample]
        )
        path = os.path.join(self.uri, "eval.md")
        write_text(self.artifact_store, path, text)
        return {path: VisualizationType.MARKDOWN}


class EvalReportMaterializer(_JsonDataclassMixin, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (EvalReport,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def extract_metadata(self, data: EvalReport) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "task": data.task,
            "primary_metric": data.primary_metric,
            "candidate": data.candidate,
            "candidate_score": data.candidate_score,
            "eval_data_hash": data.eval_data_hash,
            "eval_queries": data.eval_queries,
        }
        for v, ms in data.variants.items():
            for k, x in ms.items():
                out[f"{v}/{k}"] = float(x)
        return out

    def save_visualizations(self, data: EvalReport) -> Dict[str, VisualizationType]:
        metrics = list(next(iter(data.variants.values())).keys()) if data.variants else []
        names = list(data.variants)
        rows = [
            [
                v,
                *(float(data.variants[v][m]) for m in metrics),
                data.params.get(v, {}).get("per_user", 0),
                data.params.get(v, {}).get("shared", 0),
            ]
            for v in names
        ]
        arrow = "higher is better" if data.higher_is_better else "lower is better"
        page = (
            f"<h2>{data.task}: evaluation on {data.eval_queries} queries</h2>"
            f"<p>primary metric <b>{data.primary_metric}</b> ({arrow}); candidate <b>{data.candidate}</b></p>"
            + html_table(
                ["variant", *metrics, "per-user params", "shared params"],
                rows,
                names.index(data.candidate) if data.candidate in names else None,
            )
        )
        html_path = os.path.join(self.uri, "metrics.html")
        write_text(self.artifact_store, html_path, f"<html><body>{page}</body></html>")
        out = {html_path: VisualizationType.HTML}
        png = loss_plot_png(data.losses)
        if png:
            png_path = os.path.join(self.uri, "losses.png")
            with self.artifact_store.open(png_path, "wb") as f:
                f.write(png)
            out[png_path] = VisualizationType.IMAGE
        return out


def loss_plot_png(losses: dict[str, list[float]]) -> bytes | None:
    """Per-epoch training losses of Stage 1 and each Stage-2 variant, as PNG bytes."""
    series = {k: v for k, v in losses.items() if v}
    if not series:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, ys in series.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("training loss per epoch")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class PromotionDecisionMaterializer(_JsonDataclassMixin, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (PromotionDecision,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def extract_metadata(self, data: PromotionDecision) -> Dict[str, Any]:
        return {k: v for k, v in asdict(data).items() if v is not None}

    def save_visualizations(self, data: PromotionDecision) -> Dict[str, VisualizationType]:
        verdict = "PROMOTED to production" if data.promoted else "NOT promoted"
        rows = [
            ["candidate", f"{data.model_name} v{data.model_version}", data.candidate_score],
            [
                "production",
                f"v{data.production_version}" if data.production_version else "(none)",
                "" if data.production_score is None else data.production_score,
            ],
        ]
        text = (
            f"# {verdict}\n\n{data.reason}\n\n"
            + md_table(["", "version", data.metric], rows)
            + ("\n\n(forced by hand)" if data.forced else "")
        )
        if data.bundle_path:
            text += f"\n\nServing bundle: `{data.bundle_path}`" + (
                f" (published as `{data.serving_link}`)" if data.serving_link else ""
            )
        elif data.bundle_error:
            text += f"\n\nNo serving bundle: {data.bundle_error}"
        path = os.path.join(self.uri, "decision.md")
        write_text(self.artifact_store, path, text)
        return {path: VisualizationType.MARKDOWN}
