"""Parameter footprint of TAP-PER, P_q-only and OPPU as the user population grows (paper 4.4, Fig. 4 top).

Nothing here is a formula typed by hand: every count is the `numel` of the
tensors a method would *store* (its checkpoint), taken from the real modules
(`PrefixEncoder`, the bridge LoRA from `attach_lora`, OPPU's per-user LoRA)
built on the real backbone configuration. The modules are built on the
`meta` device, so even a Llama-3.1-8B configuration costs no memory.

Per-user cost is measured as the difference between the stored state for
n+1 and n users; the shared cost is what is left. Totals for 100 ...
1,000,000 users are `shared + N * per_user`, with linearity checked by
building the modules for a few populations (on meta, no allocation).
Backbone weights are shared by every method and reported separately.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from tapper.config import Stage2Config

USER_COUNTS = (100, 1_000, 10_000, 100_000, 1_000_000)
CHECK_USERS = (1, 2, 100, 1000)  # populations actually built (meta) to measure and check linearity

# Published configuration of Llama-3.1-8B (the paper's backbone), for comparing with its 4.4 numbers.
LLAMA31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)


def backbone_config(spec: str) -> PretrainedConfig:
    """`tiny`, `smollm2`, `llama-3.1-8b`, or an HF directory / hub id with a config.json."""
    if spec == "tiny":
        from tapper.model.backbone import TINY_CONFIG

        return LlamaConfig(vocab_size=2000, **TINY_CONFIG)
    if spec == "smollm2":
        from tapper.model.backbone import ensure_smollm2_dir

        return AutoConfig.from_pretrained(ensure_smollm2_dir())
    if spec == "llama-3.1-8b":
        return LlamaConfig(**LLAMA31_8B)
    return AutoConfig.from_pretrained(spec)


def _meta_backbone(config: PretrainedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _numel(tensors) -> int:
    return int(sum(t.numel() for t in tensors))


@functools.lru_cache(maxsize=32)
def _lora_numel(config_json: str, r: int, alpha: int, targets: tuple[str, ...]) -> int:
    """Numel of the LoRA state `attach_lora` creates on the backbone (PEFT's saved adapter tensors)."""
    from tapper.model.lora import attach_lora

    lm = _meta_backbone(_config_from_json(config_json))
    with torch.device("meta"):
        peft = attach_lora(lm, r, alpha, 0.0, list(targets))
    return _numel(get_peft_model_state_dict(peft).values())


def _config_from_json(text: str) -> PretrainedConfig:
    data = json.loads(text)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def lora_numel(config: PretrainedConfig, r: int, alpha: int, targets) -> int:
    return _lora_numel(config.to_json_string(use_diff=False), r, alpha, tuple(targets))


def tapper_state_numel(config: PretrainedConfig, cfg: Stage2Config, n_users: int) -> int:
    """Numel of what `TapPer.state_tensors()` stores: the prefix encoder state + the bridge LoRA."""
    from tapper.model.prefix import PrefixEncoder

    d = int(config.hidden_size)
    with torch.device("meta"):
        prefix = PrefixEncoder(n_users, d, cfg, emb_std=1.0)
    n = _numel(prefix.state_dict().values())
    if cfg.use_bridge:
        n += lora_numel(config, cfg.bridge_r, cfg.bridge_alpha, cfg.target_modules)
    return n


def oppu_state_numel(
    config: PretrainedConfig, r: int = 8, alpha: int = 8, targets=("q_proj", "v_proj"), n_users: int = 1
) -> int:
    """Numel of OPPU's stored adapters for n users: one LoRA (r on targets) per user."""
    return n_users * lora_numel(config, r, alpha, targets)


def backbone_numel(config: PretrainedConfig) -> int:
    return _numel(_meta_backbone(config).parameters())


@dataclass
class MethodFootprint:
    per_user: int
    shared: int
    measured: dict[int, int]  # n_users -> stored numel, from the built modules

    def total(self, n_users: int) -> int:
        return self.shared + n_users * self.per_user


def _measure(count, users=CHECK_USERS) -> MethodFootprint:
    measured = {n: count(n) for n in users}
    per_user = measured[users[1]] - measured[users[0]]
    shared = measured[users[0]] - users[0] * per_user
    for n, v in measured.items():
        if v != shared + n * per_user:
            raise AssertionError(f"stored parameters are not linear in the number of users: {n} users -> {v}")
    return MethodFootprint(per_user=per_user, shared=shared, measured=measured)


def footprint(
    spec: str = "smollm2",
    stage2: Stage2Config | None = None,
    oppu_r: int = 8,
    oppu_targets=("q_proj", "v_proj"),
    user_counts=USER_COUNTS,
) -> dict:
    """Per-user, shared and total stored parameters of each method for each population size."""
    config = backbone_config(spec)
    s2 = stage2 or Stage2Config()
    methods = {
        "tap-per": _measure(lambda n: tapper_state_numel(config, s2, n)),
        "pq-only": _measure(lambda n: tapper_state_numel(config, dataclasses.replace(s2, use_pu=False), n)),
        "oppu": _measure(lambda n: oppu_state_numel(config, oppu_r, oppu_r, oppu_targets, n)),
    }
    out = {
        "backbone": spec,
        "backbone_params": backbone_numel(config),
        "hidden_size": int(config.hidden_size),
        "layers": int(config.num_hidden_layers),
        "prefix_len": s2.prefix_len,
        "bridge": {"r": s2.bridge_r, "targets": list(s2.target_modules)},
        "oppu_lora": {"r": oppu_r, "targets": list(oppu_targets)},
        "users": list(user_counts),
        "methods": {
            k: {
                "per_user": m.per_user,
                "shared": m.shared,
                "measured": {str(n): v for n, v in m.measured.items()},
                "total": [m.total(n) for n in user_counts],
            }
            for k, m in methods.items()
        },
        "note": "stored personalization parameters (checkpoint numel), backbone excluded; per-user = state(n+1) - "
        "state(n) "
        "of modules built on the meta device; totals = shared + N * per_user",
    }
    tp, op = methods["tap-per"].per_user, methods["oppu"].per_user
    out["oppu_over_tapper_per_user"] = round(op / tp, 2) if tp else None
    i = list(user_counts).index(1000) if 1000 in user_counts else 0
    out["tapper_over_oppu_total_at"] = {
        "users": user_counts[i],
        "ratio": round(methods["tap-per"].total(user_counts[i]) / methods["oppu"].total(user_counts[i]), 4),
    }
    return out


def plot_footprint(result: dict | list[dict], path: str | Path) -> Path:
    """Log-log total stored parameters vs users, one line per method (one panel per backbone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = result if isinstance(result, list) else [result]
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    styles = {"tap-per": ("tab:red", "-"), "pq-only": ("tab:green", "--"), "oppu": ("tab:blue", "-")}
    for ax, res in zip(axes[0], results):
        for name, m in res["methods"].items():
            color, ls = styles.get(name, (None, "-"))
            ax.plot(
                res["users"],
                [max(t, 1) for t in m["total"]],
                ls,
                color=color,
                marker="o",
                label=f"{name} ({m['per_user']:,}/user)",
            )
        ax.axhline(res["backbone_params"], color="gray", lw=0.8, ls=":", label=f"backbone ({res['backbone_params']:,})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("users")
        ax.set_ylabel("stored personalization parameters")
        ax.set_title(f"{res['backbone']} (d={res['hidden_size']}, L={res['prefix_len']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_footprint(specs: list[str], out_json: str | Path, out_png: str | Path | None = None) -> list[dict]:
    from tapper.atomic import atomic_write_json

    results = [footprint(s) for s in specs]
    atomic_write_json(out_json, results if len(results) > 1 else results[0])
    if out_png:
        plot_footprint(results, out_png)
    return results


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(footprint("tiny"), indent=2))
