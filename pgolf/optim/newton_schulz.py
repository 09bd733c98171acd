"""Newton-Schulz orthogonalization for Muon: the iteration coefficients, the iteration itself, and the
MuonEq-R row normalisation applied before it.

Coefficients: the quintic (3.4445, -4.7750, 2.0315) of modded-nanogpt repeated every iteration, or the
per-iteration Polar Express tuples (arXiv:2505.16932; docs/techniques.md#polar-express).
"""

from __future__ import annotations

import torch

QUINTIC = (3.4445, -4.7750, 2.0315)
# Polar Express (arXiv:2505.16932), the tuples used by PR #1298, PR #1787 and nanochat.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_coefficients(kind: str, steps: int) -> list[tuple[float, float, float]]:
    if kind == "quintic":
        return [QUINTIC] * steps
    if kind == "polar_express":
        if not 1 <= steps <= len(POLAR_EXPRESS):
            raise ValueError(f"polar_express supports 1..{len(POLAR_EXPRESS)} steps, got {steps}")
        return list(POLAR_EXPRESS[:steps])
    raise ValueError(f"unknown Newton-Schulz variant {kind!r} (quintic | polar_express)")


def newton_schulz(G: torch.Tensor, coeffs: list[tuple[float, float, float]], dtype=torch.bfloat16, eps=1e-7):
    """Approximate the orthogonal polar factor of G [m,n] (or a batch [b,m,n]) by the odd quintic
    iteration X <- aX + (bA + cA²)X with A = XXᵀ, on the wide orientation, after Frobenius normalisation."""
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coeffs:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X


ROW_NORM_FORMS = ("fp32_clamp", "bf16_eps")


def row_normalize(U: torch.Tensor, eps: float = 1e-7, form: str = "fp32_clamp") -> torch.Tensor:
    """MuonEq-R (PR #1298): every row of the update U [rows, cols] to unit L2 norm, in U's dtype.

    `fp32_clamp` (the MuonEq-R record's, PR #1787's and PR #1611's `row_normalize`): U_i / max(||U_i||, eps)
    with the norm computed in fp32, then rounded to U's dtype for the division. `bf16_eps` (PR #1298's own):
    U_i / (||U_i|| + eps) in U's dtype (bf16 on its bank shard). Both round the norm to U's dtype, so they
    differ only where + eps and the clamp do. Raises ValueError for another form."""
    if form == "fp32_clamp":
        return U / U.float().norm(dim=-1, keepdim=True).clamp_min(eps).to(U.dtype)
    if form == "bf16_eps":
        return U / (U.norm(dim=-1, keepdim=True) + eps)
    raise ValueError(f"row norm form {form!r} not in {ROW_NORM_FORMS}")
