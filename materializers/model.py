"""Materializers for model artifacts: embedding vectors, the merged Stage-1 backbone, TAP-PER state.

Formats: safetensors + JSON, and Hugging Face directories (safetensors weights).
On a local artifact store a directory artifact is used in place (read-only);
on a remote one it is downloaded to a temporary directory on load.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Dict, Tuple, Type

from zenml.enums import ArtifactType, VisualizationType
from zenml.materializers.base_materializer import BaseMaterializer

from materializers._io import (
    download_file,
    upload_file,
    download_dir,
    is_local,
    md_table,
    read_json,
    upload_dir,
    write_json,
    write_text,
)
from materializers.types import BackboneDir, EmbeddingTable, TapPerState

VECTORS, INDEX, META = "vectors.safetensors", "index.json", "meta.json"


class EmbeddingTableMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (EmbeddingTable,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: EmbeddingTable) -> None:
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="tapper-emb-") as tmp:
            save_file({"vectors": data.vectors.contiguous()}, os.path.join(tmp, VECTORS))
            upload_file(self.artifact_store, os.path.join(tmp, VECTORS), os.path.join(self.uri, VECTORS))
        write_json(self.artifact_store, os.path.join(self.uri, INDEX), data.index)
        write_json(
            self.artifact_store,
            os.path.join(self.uri, META),
            {"key": data.key, "backbone": data.backbone, "computed": data.computed, "reused": data.reused},
        )

    def load(self, data_type: Type[Any]) -> EmbeddingTable:
        from safetensors.torch import load_file

        meta = read_json(self.artifact_store, os.path.join(self.uri, META))
        index = read_json(self.artifact_store, os.path.join(self.uri, INDEX))
        with tempfile.TemporaryDirectory(prefix="tapper-emb-") as tmp:
            download_file(self.artifact_store, os.path.join(self.uri, VECTORS), os.path.join(tmp, VECTORS))
            vectors = load_file(os.path.join(tmp, VECTORS))["vectors"]
        return EmbeddingTable(vectors=vectors, index=index, **meta)

    def extract_metadata(self, data: EmbeddingTable) -> Dict[str, Any]:
        return {
            "cache_key": data.key,
            "backbone": data.backbone,
            "vectors": data.n,
            "dim": int(data.vectors.shape[1]) if data.n else 0,
            "computed_this_run": data.computed,
            "reused_from_cache": data.reused,
        }

    def compute_content_hash(self, data: EmbeddingTable) -> str:
        import hashlib

        return hashlib.sha256((data.key + ":" + ",".join(sorted(data.index))).encode()).hexdigest()


def _dir_load(materializer: BaseMaterializer, sub: str) -> Path:
    src = os.path.join(materializer.uri, sub)
    if is_local(materializer.artifact_store):
        return Path(src)
    with materializer.get_temporary_directory(delete_at_exit=False) as tmp:
        download_dir(materializer.artifact_store, src, tmp)
        return Path(tmp)


class BackboneDirMaterializer(BaseMaterializer):
    """The merged Stage-1 backbone: an HF directory (config, safetensors weights, tokenizer)."""

    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (BackboneDir,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def save(self, data: BackboneDir) -> None:
        upload_dir(self.artifact_store, str(data.path), os.path.join(self.uri, "model"))
        write_json(
            self.artifact_store,
            os.path.join(self.uri, META),
            {
                "spec": data.spec,
                "weights_hash": data.weights_hash,
                "losses": data.losses,
                "n_examples": data.n_examples,
            },
        )

    def load(self, data_type: Type[Any]) -> BackboneDir:
        meta = read_json(self.artifact_store, os.path.join(self.uri, META))
        return BackboneDir(path=_dir_load(self, "model"), **meta)

    def extract_metadata(self, data: BackboneDir) -> Dict[str, Any]:
        import json

        cfg = json.loads((Path(data.path) / "config.json").read_text())
        size = sum(f.stat().st_size for f in Path(data.path).glob("*.safetensors"))
        return {
            "backbone": data.spec,
            "weights_hash": data.weights_hash,
            "stage1_examples": data.n_examples,
            "final_loss": data.losses[-1] if data.losses else float("nan"),
            "architecture": (cfg.get("architectures") or ["?"])[0],
            "hidden_size": cfg.get("hidden_size", 0),
            "layers": cfg.get("num_hidden_layers", 0),
            "weights_bytes": size,
        }

    def compute_content_hash(self, data: BackboneDir) -> str:
        return data.weights_hash

    def save_visualizations(self, data: BackboneDir) -> Dict[str, VisualizationType]:
        rows = [[i + 1, loss] for i, loss in enumerate(data.losses)]
        text = (
            f"# Stage-1 merged backbone\n\nbase: `{data.spec}`  \nweights sha256: `{data.weights_hash[:16]}…`  \n"
            f"trained on {data.n_examples} Stage-1 examples (task LoRA on q,k,v,o, merged)\n\n"
            + (md_table(["epoch", "loss"], rows) if rows else "Stage 1 skipped (no training).")
        )
        path = os.path.join(self.uri, "stage1.md")
        write_text(self.artifact_store, path, text)
        return {path: VisualizationType.MARKDOWN}


class TapPerStateMaterializer(BaseMaterializer):
    """TAP-PER prefix state: `prefix.safetensors` + `tapper_config.json` (TapPer.save's format)."""

    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (TapPerState,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def save(self, data: TapPerState) -> None:
        from dataclasses import asdict

        upload_dir(self.artifact_store, str(data.path), os.path.join(self.uri, "state"))
        meta = {k: v for k, v in asdict(data).items() if k != "path"}
        write_json(self.artifact_store, os.path.join(self.uri, META), meta)

    def load(self, data_type: Type[Any]) -> TapPerState:
        meta = read_json(self.artifact_store, os.path.join(self.uri, META))
        return TapPerState(path=_dir_load(self, "state"), **meta)

    def extract_metadata(self, data: TapPerState) -> Dict[str, Any]:
        return {
            "variant": data.variant,
            "users": data.users,
            "per_user_params": data.per_user_params,
            "shared_params": data.shared_params,
            "backbone_hash": data.backbone_hash,
            "stage2_examples": data.n_train,
            "lambda_t": data.lambda_t,
            "lambda_o": data.lambda_o,
            "final_loss": data.losses[-1] if data.losses else float("nan"),
        }

    def save_visualizations(self, data: TapPerState) -> Dict[str, VisualizationType]:
        rows = [[k, v] for k, v in self.extract_metadata(data).items()]
        text = f"# TAP-PER state ({data.variant})\n\n" + md_table(["quantity", "value"], rows)
        text += "\n\n## Stage-2 loss per epoch\n\n" + md_table(
            ["epoch", "loss"], [[i + 1, loss] for i, loss in enumerate(data.losses)]
        )
        path = os.path.join(self.uri, "state.md")
        write_text(self.artifact_store, path, text)
        return {path: VisualizationType.MARKDOWN}
