"""Parameter roles by name: which tensors are embeddings, auxiliary projections and control tensors.

One table that the optimizer partition (pgolf/optim/groups.py) and the quantization rules (pgolf/quant/rules.py)
both read, so an optimizer group and an export rule never disagree about what a tensor is.
"""

from __future__ import annotations

# Control tensors: kept fp32 at export and never sent to Muon even when 2-D (the baseline's
# CONTROL_TENSOR_NAME_PATTERNS, records/track_10min_16mb/2026-03-17_NaiveBaseline), plus the gates and lane
# weights of PR #1611 (its list adds skip_gates, parallel_post_lambdas, parallel_resid_lambdas, attn_gate_w,
# smear_gate, smear_lambda; pgolf's gated SmearGate is `smear.gate` / `smear.lam`, matched by "smear").
CONTROL_PATTERNS = (
    "attn_scale",
    "mlp_scale",
    "resid_mix",
    "q_gain",
    "skip_weight",
    "smear",
    "ve_layer_scales",
    "skip_gates",
    "parallel_post_lambdas",
    "parallel_resid_lambdas",
    "attn_gate_w",
)
# Embedding tables (Adam, the embedding learning rate).
EMBED_NAMES = ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight")
# Projections of the BigramHash and value-embedding tables to model width (Adam scalars unless
# `optim.aux_proj_to_muon`).
AUX_PROJ_NAMES = ("bigram.proj.weight", "ve_shared.proj.weight")


def is_control(name: str) -> bool:
    """True when the parameter `name` contains one of CONTROL_PATTERNS."""
    return any(pat in name for pat in CONTROL_PATTERNS)
