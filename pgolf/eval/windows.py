"""Which windows score which targets: the sliding-window plans of the sliding, score-first TTT and SLOT modes.

A window is `(start, length, score_from)` or `(start, length, score_from, first_from)`: inputs
`val[start : start+length]`, targets shifted by one (target index t predicts `val[t+1]` from `val[:t+1]`).
The mode's metric scores positions `[score_from, length)`; `first_from` (default `score_from`) is where the
positions begin whose target no earlier window scored, i.e. pgolf's each-target-once figure counts
`[first_from, length)`. Both ranges end at the window's end. A window's head runs on
`[min(score_from, first_from), length)`.

Three plans (the `windows` setting of the modes):
* `once` (pgolf's default): starts 0, stride, 2·stride, ...; window 0 scores all its positions, later windows
  their last `stride`; windows stop once the stream's last target is scored, and the final window scores
  only targets no window scored before: every target is scored exactly once, with at least S - stride
  tokens of context.
* `reference`: the records' windows (records/track_10min_16mb/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon,
  PR #549, and PR #1019, #1263, #1298 after it): a window at every start ws < total, of length
  min(S, total - ws); the tail windows are shorter and all re-score the final targets. The score-first TTT
  of PR #549 keeps only windows of at least `stride` targets (and window 0).
* `v5`: the 1.1556 record's own variant (records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd):
  (total - S) // stride + 1 windows of S targets, every window (window 0 too) scoring only its last
  `stride` positions, so the first S - stride targets and the targets after the last window are never
  scored. The plan holds pgolf's `once` windows, with the record's scored range in `score_from`.
"""

from __future__ import annotations

Window = tuple[int, ...]  # (start, length, score_from) or (start, length, score_from, first_from)
WINDOW_PLANS = ("once", "reference", "v5")


def _check(seq_len: int, stride: int) -> None:
    if stride <= 0 or stride > seq_len:
        raise ValueError(f"stride {stride} must be in 1..{seq_len}")


def sliding_windows(total_targets: int, seq_len: int, stride: int) -> list[Window]:
    """pgolf's sliding windows (`once` in the module docstring): every target scored exactly once, from
    a window starting at a multiple of `stride`, with at least S - stride tokens of context where the stream
    has them. 3-tuples. Raises ValueError unless 0 < stride <= seq_len."""
    _check(seq_len, stride)
    out: list[Window] = []
    scored_to = 0
    ws = 0
    while ws < total_targets:
        n = min(seq_len, total_targets - ws)
        lo = 0 if ws == 0 else max(n - stride, 0)
        lo = max(lo, scored_to - ws)
        if lo < n:
            out.append((ws, n, lo))
            scored_to = ws + n
        if scored_to >= total_targets:
            break
        ws += stride
    return out


def reference_windows(total_targets: int, seq_len: int, stride: int, min_len: int = 1) -> list[Window]:
    """The records' windows (`reference` in the module docstring), as 4-tuples whose `first_from` marks
    each target's first scoring. Windows shorter than `min_len` are dropped, window 0 excepted (PR #549's
    score-first TTT: min_len = stride; its sliding eval: 1)."""
    _check(seq_len, stride)
    plain = []
    for ws in range(0, total_targets, stride):
        n = min(seq_len, total_targets - ws)
        if ws == 0 or n >= min_len:
            plain.append((ws, n, 0 if ws == 0 else max(n - stride, 0)))
    return with_first(plain)


def v5_windows(total_targets: int, seq_len: int, stride: int) -> list[Window]:
    """The 1.1556 record's windows (`v5` in the module docstring): pgolf's `once` windows, each with the
    record's scored range as `score_from` (its last `stride` positions for the record's
    (total - S) // stride + 1 full windows, none for the others) and pgolf's as `first_from`.
    Raises ValueError when the stream holds fewer than seq_len targets (the record scores nothing)."""
    if total_targets < seq_len:
        raise ValueError(f"v5 windows need at least seq_len={seq_len} targets, the stream has {total_targets}")
    out: list[Window] = []
    for ws, n, lo in sliding_windows(total_targets, seq_len, stride):
        out.append((ws, n, seq_len - stride if n == seq_len else n, lo))
    return out


def plan_windows(plan: str, total_targets: int, seq_len: int, stride: int, min_len: int = 1) -> list[Window]:
    """The windows of `plan` (once | reference | v5); `min_len` applies to `reference` only."""
    if plan == "once":
        return sliding_windows(total_targets, seq_len, stride)
    if plan == "reference":
        return reference_windows(total_targets, seq_len, stride, min_len)
    if plan == "v5":
        return v5_windows(total_targets, seq_len, stride)
    raise ValueError(f"windows {plan!r} not in {WINDOW_PLANS}")


def with_first(windows: list[Window]) -> list[Window]:
    """4-tuples `(start, length, score_from, first_from)`: `first_from` the first scored position whose
    target no earlier window of the list scored (the window's length when there is none). Every window's
    scored range ends at its end, and ends never decrease along the list, so a target is first scored in
    the earliest window that scores it."""
    out: list[Window] = []
    scored_to = 0
    for w in windows:
        ws, n, lo = w[0], w[1], w[2]
        out.append((ws, n, lo, min(max(lo, scored_to - ws), n)))
        scored_to = max(scored_to, ws + n)
    return out


def scored_ranges(windows: list[Window], first: bool = False) -> list[tuple[int, int]]:
    """[a, b) target ranges the windows score for the metric (`first`: for the each-target-once figure)."""
    col = 3 if first else 2
    return [(w[0] + (w[col] if len(w) > col else w[2]), w[0] + w[1]) for w in windows]


def distinct_targets(windows: list[Window]) -> int:
    """How many distinct targets the windows' metric scores (each counted once, however often scored)."""
    count, hi = 0, 0
    for a, b in sorted(scored_ranges(windows)):
        count += max(0, b - max(a, hi))
        hi = max(hi, b)
    return count


def scorings(windows: list[Window]) -> int:
    """How many target scorings the windows' metric makes (a target scored twice counts twice)."""
    return sum(max(0, b - a) for a, b in scored_ranges(windows))
