"""What every Hugging Face family shares: reading the ``"megamoe"`` entry of ``config.json``, and
the export checks all of them make (each family adds its own: ``hf.config``, ``hf.deepseek_v3``)."""

from __future__ import annotations

import dataclasses

from megamoe.model.config import ModelConfig


def megamoe_fields(hf: dict) -> dict:
    """The architecture fields ``config.json``'s ``"megamoe"`` entry holds (exports of earlier
    versions also put execution choices there, which are not read)."""
    architecture = {f.name for f in dataclasses.fields(ModelConfig)}
    return {key: value for key, value in hf.get("megamoe", {}).items() if key in architecture}


def common_export_problems(config: ModelConfig, name: str) -> list[str]:
    """Why ``config``'s model cannot be any of the families (``name``: the family's, for the
    messages): RMSNorm, SwiGLU, no linear biases, an MoE with one expert count."""
    problems = []
    if config.normalization != "RMSNorm":
        problems.append(f"--normalization {config.normalization} ({name} uses RMSNorm)")
    if not config.swiglu:
        problems.append(f"GeLU MLPs, no --swiglu ({name}'s MLPs are SwiGLU)")
    if config.add_bias_linear:
        problems.append(f"linear biases, no --disable-bias-linear ({name} has none)")
    if not config.num_experts:
        problems.append(f"a dense model, no --num-experts ({name} is a mixture of experts)")
    elif len(set(config.num_experts)) > 1:
        problems.append(f"--num-experts {list(config.num_experts)} per layer ({name} has one expert count)")
    return problems
