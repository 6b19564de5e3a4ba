"""TAP-PER: the frozen merged backbone + bridge LoRA + the prefix encoder.

Only the prefix encoder (user table, DIN scorer, projection, λ's) and the
bridge LoRA train; `trainable_parameters()` is the single source of truth for
that, used by Stage 2, the online updates and the tests.

Saved state is the personalization part only: `prefix.safetensors` (prefix
encoder + bridge LoRA tensors), `tapper_config.json` (Stage-2 config, d,
user ids, backbone hash). The backbone lives in its own directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from tapper.atomic import atomic_write, atomic_write_json
from tapper.config import Stage2Config, from_dict
from tapper.model.lora import PositionScope, attach_lora
from tapper.model.prefix import INPUT_STATS, PrefixEncoder
from tapper.model.prefixed_lm import PrefixedLM
from tapper.precision import cast_backbone, set_checkpointing
from tapper.train.features import EncodedExample, lm_generate_batch, lm_train_batch, prefix_inputs

STATE_FILE = "prefix.safetensors"
CONFIG_FILE = "tapper_config.json"


class TapPer(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        user_ids: list[str],
        cfg: Stage2Config,
        backbone_hash: str = "",
        init_user_table: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.user_ids = list(user_ids)
        # Row 0 is the "unknown user" row (P_q only); known users start at 1.
        self.user_rows = {u: i + 1 for i, u in enumerate(self.user_ids)}
        self.backbone_hash = backbone_hash
        # Set when the user table is paged (tapper.model.paged_table): where its scratch files go, so that a table
        # replaced later (growth, reload) is paged too. None: an ordinary in-memory table.
        self.table_dir: Path | None = None
        for p in backbone.parameters():
            p.requires_grad_(False)
        # The frozen backbone in the configured precision; the bridge LoRA (PEFT keeps adapters fp32) and the
        # prefix encoder (created below, fp32) are the fp32 master weights (tapper.precision).
        cast_backbone(backbone, cfg.dtype)
        set_checkpointing(backbone, cfg.gradient_checkpointing)
        emb = backbone.get_input_embeddings().weight
        self.d = int(emb.shape[1])
        # On the meta device (tapper.plan builds this model to count bytes) there are no values to measure.
        emb_std = 1.0 if emb.is_meta else float(emb.detach().float().std())
        lm = (
            attach_lora(backbone, cfg.bridge_r, cfg.bridge_alpha, cfg.bridge_dropout, cfg.target_modules)
            if cfg.use_bridge
            else backbone
        )
        scope = PositionScope(lm) if cfg.use_bridge and cfg.bridge_scope == "prefix" else None
        self.plm = PrefixedLM(lm, scope)
        self.prefix = PrefixEncoder(len(self.user_ids), self.d, cfg, emb_std, init_user_table).to(emb.device)

    # --- parameters -------------------------------------------------------------------

    def bridge_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.plm.lm.named_parameters() if "lora_" in n]

    def shared_prefix_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.prefix.named_parameters() if not n.startswith("user_table")]

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Groups that Stage 2 trains: user table, shared prefix network, λ's, bridge."""
        lambdas = [self.prefix.lambda_t_raw, self.prefix.lambda_o_raw]
        shared = [p for p in self.shared_prefix_parameters() if all(p is not q for q in lambdas)]
        groups = {
            "user_table": [self.prefix.user_table.weight] if self.cfg.use_pu else [],
            "shared": shared if self.cfg.use_pq else [],
        }
        groups["lambdas"] = [
            p for p, on in zip(lambdas, [self.cfg.use_lambda_t, self.cfg.use_lambda_o]) if on and self.cfg.use_pq
        ]
        groups["bridge"] = self.bridge_parameters()
        return groups

    def per_user_params(self) -> int:
        return self.prefix.per_user_params() if self.cfg.use_pu else 0

    @property
    def rows_in_use(self) -> int:
        """Rows of the user table that hold a user: row 0 (unknown user) + one per user id.

        The table may hold more (spare zero rows, so that a new user does not copy the whole
        table; see tapper.online.update.add_users); those are never trained and never saved."""
        return len(self.user_ids) + 1 if self.cfg.use_pu else 1

    def user_table_in_use(self) -> torch.Tensor:
        """The user table's rows in use (a view, without the spare rows)."""
        return self.prefix.user_table.weight[: self.rows_in_use]

    def shared_params(self) -> int:
        """Parameters shared by all users: bridge LoRA + DIN/projection MLPs + λ's (not the backbone)."""
        groups = self.trainable_parameters()
        return sum(p.numel() for k in ("shared", "lambdas", "bridge") for p in groups[k])

    # --- forward ----------------------------------------------------------------------

    def prefix_for(self, items: list[EncodedExample], vectors: torch.Tensor):
        device = self.plm.device
        inputs = [t.to(device) for t in prefix_inputs(items, vectors)]
        return self.prefix(*inputs)

    def loss(self, items: list[EncodedExample], vectors: torch.Tensor, pad_id: int) -> torch.Tensor:
        P, _ = self.prefix_for(items, vectors)
        return self.plm.loss(lm_train_batch(items, pad_id), P)

    @torch.no_grad()
    def generate(self, items, vectors, pad_id: int, eos_id: int, max_new_tokens: int) -> list[list[int]]:
        P, _ = self.prefix_for(items, vectors)
        return self.plm.generate(lm_generate_batch(items, pad_id), P, max_new_tokens, eos_id)

    # --- persistence ------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # Spare rows are not state: the saved table has exactly one row per user (+ row 0), and only
        # those rows are copied off the device.
        out = {
            f"prefix.{k}": v.detach().cpu().contiguous()
            for k, v in self.prefix.state_dict().items()
            if k != "user_table.weight"
        }
        out["prefix.user_table.weight"] = self.user_table_in_use().detach().cpu().contiguous()
        if self.cfg.use_bridge:
            for k, v in get_peft_model_state_dict(self.plm.lm).items():
                out[f"bridge.{k}"] = v.detach().cpu().contiguous()
        return out

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / STATE_FILE, lambda tmp: save_file(self.state_tensors(), tmp))
        atomic_write_json(
            directory / CONFIG_FILE,
            {"stage2": asdict(self.cfg), "d": self.d, "user_ids": self.user_ids, "backbone_hash": self.backbone_hash},
        )
        return directory

    @staticmethod
    def saved_dtype(directory: str | Path) -> str:
        """The backbone precision a saved state was trained with: load the backbone in it (its weights hash, which
        the state records, is the hash of the backbone as loaded in that precision)."""
        meta = json.loads((Path(directory) / CONFIG_FILE).read_text())
        return meta["stage2"].get("dtype", "fp32")

    @classmethod
    def load(cls, directory: str | Path, backbone: nn.Module, table_dir: str | Path | None = None) -> "TapPer":
        """Load a saved state onto `backbone`. `table_dir`: page the user table there (tapper.model.paged_table),
        filling it from the file in chunks, so the whole table is never held in anonymous memory."""
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        # A state saved before inputs were standardized read them unit-RMS only, and has no statistics to load.
        meta["stage2"].setdefault("input_norm", "unit_rms")
        cfg = from_dict(Stage2Config, meta["stage2"], f"{directory / CONFIG_FILE}: stage2")
        model = cls(backbone, meta["user_ids"], cfg, meta.get("backbone_hash", ""), init_user_table=False)
        if table_dir is None:
            tensors = load_file(directory / STATE_FILE)
            prefix_sd = {k[len("prefix.") :]: v for k, v in tensors.items() if k.startswith("prefix.")}
            missing, unexpected = model.prefix.load_state_dict(prefix_sd, strict=False)
            if unexpected or (missing and (cfg.input_norm != "unit_rms" or set(missing) - set(INPUT_STATS))):
                raise ValueError(
                    f"{directory / STATE_FILE}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}"
                )
        else:
            tensors = _load_paged(model, directory / STATE_FILE, table_dir)
        if cfg.use_bridge:
            bridge_sd = {k[len("bridge.") :]: v for k, v in tensors.items() if k.startswith("bridge.")}
            result = set_peft_model_state_dict(model.plm.lm, bridge_sd)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{directory / STATE_FILE}: unexpected bridge tensors {unexpected[:5]}")
        model.eval()
        return model


def _load_paged(model: TapPer, state_file: Path, table_dir: str | Path) -> dict[str, torch.Tensor]:
    """TapPer.load's prefix part with a paged user table; returns the other tensors (for the bridge)."""
    from tapper.model.paged_table import TABLE_KEY, load_prefix_paged, prepare_table_dir

    expected = model.prefix.user_table.num_embeddings
    tensors = load_prefix_paged(model, state_file, prepare_table_dir(table_dir))
    rows = model.prefix.user_table.num_embeddings
    if rows != expected:
        raise ValueError(f"{state_file}: {TABLE_KEY} has {rows} rows, the config's users need {expected}")
    return tensors
