"""Pure schedule functions (the baseline train_gpt.py's warmdown, the final records' warmdown by training
fraction with a floor, and the Muon momentum warm-up); callbacks only apply them."""

from __future__ import annotations


def train_fraction(
    step: int, elapsed_ms: float, *, iterations: int, max_wallclock_ms: float, reserve_ms: float = 0.0
) -> float:
    """The training fraction of the final records (PR #1611): elapsed / (cap - `reserve_ms`) with a wall-clock
    cap (the reserve keeps GPTQ's training-data reads inside the budget), else step / iterations; >= 0."""
    budget = max_wallclock_ms - reserve_ms
    if max_wallclock_ms > 0 and budget > 0:
        return max(elapsed_ms, 0.0) / budget
    return max(step, 0) / max(iterations, 1)


def lr_scale(
    step: int,
    elapsed_ms: float,
    *,
    iterations: int,
    warmdown_iters: int,
    max_wallclock_ms: float,
    warmdown_frac: float = 0.0,
    min_lr: float = 0.0,
    reserve_ms: float = 0.0,
) -> float:
    """LR multiplier in [0, 1]; no warm-up.

    With `warmdown_frac` > 0 (the final records, PR #1787 / #1611): by training fraction, `frac` =
    elapsed / (cap - `reserve_ms`) with a wall-clock cap, else step / iterations; the multiplier is 1 while
    frac < 1 - warmdown_frac, then max((1 - frac) / warmdown_frac, `min_lr`): linear to the floor, then flat
    (PR #1611: 0.85 and 0.1, reserve 500 ms for GPTQ).
    Otherwise by steps (`warmdown_iters`, the baseline and seed records): with a wall-clock cap, the warmdown
    lasts `warmdown_iters` steps at the current average step time and ends exactly where the clock stops training
    (the cap minus `reserve_ms`), `scale = remaining / warmdown_ms` once the remaining time is shorter than it;
    without a cap, linear decay over the
    last `warmdown_iters` of `iterations` steps.
    """
    if warmdown_frac > 0:
        frac = train_fraction(
            step, elapsed_ms, iterations=iterations, max_wallclock_ms=max_wallclock_ms, reserve_ms=reserve_ms
        )
        if frac < 1.0 - warmdown_frac:
            return 1.0
        return max((1.0 - frac) / warmdown_frac, min_lr)
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_ms > 0:
        step_ms = elapsed_ms / max(step, 1)
        warmdown_ms = warmdown_iters * step_ms
        remaining = max(max_wallclock_ms - reserve_ms - elapsed_ms, 0.0)  # to where the clock stops training
        return 1.0 if remaining > warmdown_ms else remaining / max(warmdown_ms, 1e-9)
    start = iterations - warmdown_iters
    if step < start:
        return 1.0
    return max((iterations - step) / warmdown_iters, 0.0)


def muon_momentum(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """Linear warm-up of the Muon momentum from `start` to `end` over `warmup_steps` steps."""
    if warmup_steps <= 0:
        return end
    f = min(step / warmup_steps, 1.0)
    return (1 - f) * start + f * end
