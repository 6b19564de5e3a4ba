"""ZenML materializers for tapper's artifacts (safetensors / JSON / HF directories, never pickle).

Importing this package registers them with ZenML's materializer registry.
"""

from materializers.dataset import LampDatasetMaterializer, LampFilesMaterializer, PreparedDataMaterializer
from materializers.evaluation import EvalReportMaterializer, PromotionDecisionMaterializer, VariantResultMaterializer
from materializers.model import BackboneDirMaterializer, EmbeddingTableMaterializer, TapPerStateMaterializer
from materializers.reports import ComparisonReportMaterializer, OnlineTrajectoriesMaterializer

__all__ = [
    "LampFilesMaterializer",
    "LampDatasetMaterializer",
    "PreparedDataMaterializer",
    "EmbeddingTableMaterializer",
    "BackboneDirMaterializer",
    "TapPerStateMaterializer",
    "VariantResultMaterializer",
    "EvalReportMaterializer",
    "PromotionDecisionMaterializer",
    "OnlineTrajectoriesMaterializer",
    "ComparisonReportMaterializer",
]
