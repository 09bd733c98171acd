"""Full-Hessian GPTQ (arXiv:2210.17323; PR #535 lineage, the PR #1019 variant) and the Hessians it needs.

`collect_hessians`: forward hooks on the model's `quantized_linears()` accumulate `Σ XᵀX` of each linear's
input over calibration sequences (`H.addmm_(X.T, X)` per linear and batch, the records' rounding),
divided by the number of sequences (PR #1019) or of forward batches (PR #1611),
optionally moved to another device first (PR #1611 moves them to the CPU, where its GPTQ runs), optionally
damped.

`gptq_quantize`: one matrix W [rows, cols] with its Hessian H [cols, cols] -> per-row intN codes and fp16
scales. Dead inputs (diag H = 0) get diag 1 and a zero weight column; damping `damp·mean(diag H)·I`;
act-order (columns by descending diag H); the upper Cholesky factor U of H⁻¹ (Cholesky of H, then the
Cholesky-based inverse); columns in blocks of `block_size`, each quantized and its error spread over the
later columns of the block through U's rows, then onto the columns after the block (lazy batch update).
Every clip level of the GPTQ-lite list is tried and the one with the lowest weight MSE kept (per matrix,
or per row with `per_row`). Rows are independent given U, so the clip candidates run together as one
stacked matrix (one column loop for all of them). With `sigmas` (SDClip, PR #1394; the per-class sigmas of
PR #1586 as PR #1611 runs them) there is no search: one row scale `fp16(sigmas·std(W_r)/qmax)` of the
original rows, and the clamp to ±qmax inside the column loop does the clipping.

With `output_head`, `collect_hessians` also collects the Hessian of the output projection, whose input is
the final-normed hidden state `forward_hidden` returns: for a tied model that is the token embedding's
(PR #1611 hooks its `final_norm` output for `tok_emb.weight` and quantizes the embedding with GPTQ at int7).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from pgolf.optional import register
from pgolf.quant.numerics import GPTQ_LITE_CLIPS, code_bounds, fp16_scale_rows, round_codes, sdclip_scale_rows
from pgolf.quant.rules import QuantRule, pick_rule
from pgolf.quant.settings import HESSIAN_FORWARDS


def candidate_scales(w: torch.Tensor, bits: int, clips: Sequence[float], floor: bool = True) -> torch.Tensor:
    """fp16-rounded row scales [len(clips), rows] for each clip level (quantile of |w| per row; 1.0 = max)."""
    return torch.stack([fp16_scale_rows(w, bits, float(c), floor).view(-1) for c in clips])


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U with H⁻¹ = UᵀU (upper triangular), through the Cholesky factor of H."""
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def prepare_hessian(
    w: torch.Tensor, H: torch.Tensor, damp: float, act_order: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Dead columns, damping, act-order. Returns (W permuted, H permuted, perm, number of dead columns)."""
    W, H = w.clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.size(0), dtype=H.dtype, device=H.device)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(H.size(0), device=H.device)
    return W[:, perm], H[perm][:, perm], perm, int(dead.sum())


@contextlib.contextmanager
def cpu_threads(n: int, device: torch.device):
    """Run CPU tensor code with n intra-op threads (restored afterwards). The column loop is thousands of
    small ops: measured on a shared 2-core machine, a 512x1536 matrix took 8.6 s with 2 threads and 2.3 s
    with 1 (thread hand-off costs more than the ops)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_columns(
    W: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, qmax: int, block_size: int, qmin: int | None = None
) -> torch.Tensor:
    """The GPTQ column loop on W [rows, cols] (already permuted) with U from `upper_cholesky_of_inverse`
    and a scale per row [rows]; codes in [qmin, qmax] (qmin defaults to -qmax). Returns integer codes
    [rows, cols] (as W's dtype). A zero scale is used as it is (the records' arithmetic): a nonzero weight
    over it clamps to ±qmax, 0/0 gives NaN, which runs along the row through the error feedback; such NaN
    codes are returned as 0 (the int8 cast of NaN on x86)."""
    with cpu_threads(1, W.device):
        return torch.nan_to_num(_gptq_columns(W, U, scale, qmax, block_size, qmin), nan=0.0)


def _gptq_columns(
    W: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, qmax: int, block_size: int, qmin: int | None
) -> torch.Tensor:
    W = W.clone()
    rows, cols = W.shape
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diagonal(U1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = round_codes(w, scale, qmax, qmin)
            Q[:, i1 + i] = q
            err = (w - q * scale) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # W1[:, j] -= err * U1[i, j] for j >= i
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q


@register("gptq")
def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int = 6,
    clips: Sequence[float] = GPTQ_LITE_CLIPS,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    floor: bool = True,
    per_row: bool = False,
    full_range: bool = False,
    dtype: torch.dtype = torch.float32,
    sigmas: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """GPTQ of one matrix: (q int8 [rows, cols], scale fp16 [rows], info); codes symmetric in ±qmax, or
    with `full_range` in [-qmax-1, qmax] (`code_bounds`).

    With `sigmas` (SDClip, PR #1394): `clips`, `floor` and `per_row` are not used; the row scale is
    `sdclip_scale_rows` of w as given (unpermuted, dead columns included, in fp32, as the reference). A row
    whose fp16 scale underflows to 0 keeps the reference's arithmetic: a nonzero weight over the zero scale
    clamps to ±qmax and 0/0 is stored as 0 (the int8 cast of NaN on x86; the NaN error then runs along the
    row, whose later codes are 0 too); every such code de-quantizes to 0. Where H is numerically not positive
    definite the Cholesky is retried with more damping and `info["extra_damp"]` says how much (× mean diag H;
    the records stop there). Raises ValueError for mismatched shapes, or with sigmas for fewer than 2
    columns."""
    if w.ndim != 2 or H.shape != (w.size(1), w.size(1)):
        raise ValueError(f"gptq needs W [rows, cols] and H [cols, cols]; got {tuple(w.shape)} and {tuple(H.shape)}")
    qmin, qmax = code_bounds(bits, full_range)
    rows = w.size(0)
    s_sd = sdclip_scale_rows(w, bits, sigmas) if sigmas is not None else None
    # runs where the Hessian lives: the CPU, or the GPU during a training-end export with gptq.device=model
    Wp, Hp, perm, n_dead = prepare_hessian(w.to(H.device, dtype), H.to(dtype), damp, act_order)
    U, extra = _robust_upper_cholesky_of_inverse(Hp)
    inv = torch.argsort(perm)
    if s_sd is not None:
        s = s_sd.to(H.device)
        q = gptq_columns(Wp, U, s.to(dtype), qmax, block_size, qmin)
        info = {"method": "gptq", "clip": "sdclip", "sigmas": float(sigmas), "dead_columns": n_dead}
        if extra:
            info["extra_damp"] = extra
        return q[:, inv].to(torch.int8).cpu().contiguous(), s.cpu(), info
    # Row clips on the (dead-zeroed) weights; a row's quantile/max does not depend on the column order.
    S = candidate_scales(Wp, bits, clips, floor).to(dtype)  # [C, rows]
    C = S.size(0)
    Q = gptq_columns(Wp.repeat(C, 1), U, S.reshape(-1), qmax, block_size, qmin).view(C, rows, -1)
    err = (Wp[None] - Q * S[:, :, None]).square().mean(dim=2)  # [C, rows]: MSE against the original W
    if per_row:
        best = err.argmin(dim=0)  # [rows]
        ar = torch.arange(rows, device=Q.device)
        q, s = Q[best, ar], S[best, ar]
        chosen: object = [float(clips[i]) for i in best.tolist()]
    else:
        b = int(err.mean(dim=1).argmin())
        q, s, chosen = Q[b], S[b], float(clips[b])
    q = q[:, inv].to(torch.int8).contiguous()
    info = {"method": "gptq", "clip": chosen if not per_row else "per_row", "dead_columns": n_dead}
    if extra:
        info["extra_damp"] = extra
    return q.cpu(), s.half().cpu(), info


def _robust_upper_cholesky_of_inverse(H: torch.Tensor, tries: int = 5) -> tuple[torch.Tensor, float]:
    """(upper Cholesky of H⁻¹, extra damping used as a multiple of mean diag H: 0 where H is positive
    definite); where it is numerically not, damp more (0.01, then x10 each try)."""
    extra = 0.0
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.size(0), dtype=H.dtype, device=H.device)
    for _ in range(tries):
        try:
            return upper_cholesky_of_inverse(H + extra * mean_diag * eye), extra
        except torch.linalg.LinAlgError:
            extra = 0.01 if extra == 0 else extra * 10
    raise ValueError("GPTQ: the Hessian is not positive definite even after extra damping")


# ---- Hessians from calibration sequences ----------------------------------------------------------
def linear_names(model: nn.Module) -> dict[nn.Module, str]:
    """The quantized linears of a GPT and their weight names in the state dict."""
    names = {m: n for n, m in model.named_modules()}
    return {m: f"{names[m]}.weight" for m in model.quantized_linears()}


@contextlib.contextmanager
def xtx_hooks(targets: dict[nn.Module, str], H: dict[str, torch.Tensor]) -> Iterator[None]:
    """Forward hooks that add each target linear's input `XᵀX` (fp32) into `H[its weight name]` while the
    block runs, as the records' GPTQ hooks do (`H.addmm_(X.T, X)` per linear, PR #1019 ... PR #1611: the same
    rounding; c_q/c_k/c_v read the same X and each accumulates its own)."""

    def hook(mod, args, out):
        x = args[0].detach().reshape(-1, args[0].size(-1)).float()
        H[targets[mod]].addmm_(x.T, x)

    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def output_head_name(model: nn.Module) -> str:
    """The state-dict name of the output projection's weight: `tok_emb.weight` when the head is tied to the
    token embedding, else `lm_head.weight`."""
    return "tok_emb.weight" if getattr(model, "lm_head", None) is None else "lm_head.weight"


def needs_output_hessian(model: nn.Module, rules: Sequence[QuantRule]) -> bool:
    """Whether the rule that stores the output projection's weight (`output_head_name`) is a GPTQ rule, so
    `collect_hessians` should be called with `output_head=True` (PR #1611: int7 GPTQ of the tied embedding)."""
    name = output_head_name(model)
    rule = pick_rule(name, model.output_weight().detach(), list(rules))
    return rule.store == "int" and rule.method == "gptq"


def _forward_sequences(
    model: nn.Module,
    seqs: torch.Tensor,
    batch: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    on_hidden: Callable[[torch.Tensor], None] | None = None,
) -> tuple[int, int, int]:
    """`model.forward_hidden` over token ids [N, T], `batch` rows at a time, in eval mode (restored after);
    `on_hidden` receives each batch's final-normed hidden states [B, T, d]. Returns (sequences, tokens,
    batches) seen."""
    was_training = model.training
    model.eval()
    n_seq = n_tok = n_batch = 0
    try:
        for i in range(0, seqs.size(0), batch):
            xb = seqs[i : i + batch].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                h = model.forward_hidden(xb)
            if on_hidden is not None:
                on_hidden(h)
            n_seq += xb.size(0)
            n_tok += xb.numel()
            n_batch += 1
    finally:
        model.train(was_training)
    return n_seq, n_tok, n_batch


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    sequences: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch: int = 8,
    damp: float = 0.0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    output_head: bool = False,
    norm: str = "sequences",
    out_device: torch.device | str | None = None,
    forward: str = "autocast",
) -> tuple[dict[str, torch.Tensor], dict]:
    """`Σ XᵀX` (fp32) of the input of every quantized linear over `sequences` [N, T] (token ids), fed `batch`
    rows per forward; moved to `out_device` (None: stays on `device`), then divided by `norm`: `sequences`
    (N, PR #1019) or `batches` (the number of forwards, ⌈N/batch⌉: PR #1611 divides by
    GPTQ_CALIBRATION_BATCHES after `.cpu()`); plus `damp·mean(diag)·I` (the PR #1019 record adds 0.01 here).
    With `output_head`, also the output projection's (`output_head_name`: `tok_emb.weight` when tied), whose
    input X is the final-normed hidden state [B·T, d] that `forward_hidden` returns (PR #1611's hook on
    `final_norm`). `forward`: `autocast` runs the model as it is, under `autocast_dtype` when given (PR #1019's
    calibration under bf16 autocast); `bf16` runs a bf16 copy of it without autocast (`model` is left as it
    is), so every activation, and so every X, is bf16 as in PR #1611, whose calibration forward runs its bf16
    model with autocast off. Returns ({weight name: H [in, in] on `out_device` or the forward's device},
    info); raises ValueError with no sequences or an unknown `norm` or `forward`."""
    if norm not in ("sequences", "batches"):
        raise ValueError(f"collect_hessians: norm {norm!r} is not sequences or batches")
    if forward not in HESSIAN_FORWARDS:
        raise ValueError(f"collect_hessians: forward {forward!r} not in {HESSIAN_FORWARDS}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if forward == "bf16":
        model, autocast_dtype = copy.deepcopy(model).to(torch.bfloat16), None
    targets = linear_names(model)
    H = {
        name: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=device)
        for m, name in targets.items()
    }
    on_hidden = None
    if output_head:
        head = output_head_name(model)
        d = model.output_weight().size(1)
        H[head] = torch.zeros(d, d, dtype=torch.float32, device=device)

        def on_hidden(h: torch.Tensor) -> None:
            x = h.detach().reshape(-1, h.size(-1)).float()
            H[head].addmm_(x.T, x)

    t0 = time.perf_counter()
    seqs = sequences if isinstance(sequences, torch.Tensor) else torch.cat(list(sequences))
    with xtx_hooks(targets, H):
        n_seq, n_tok, n_batch = _forward_sequences(model, seqs, batch, device, autocast_dtype, on_hidden)
    if n_seq == 0:
        raise ValueError("no calibration sequences to collect Hessians from")
    if out_device is not None:
        H = {name: h.to(out_device) for name, h in H.items()}
    n = n_seq if norm == "sequences" else n_batch
    for h in H.values():
        h /= n
        if damp > 0:
            h += damp * torch.mean(torch.diag(h)) * torch.eye(h.size(0), device=h.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {
        "layers": len(H),
        "sequences": n_seq,
        "batches": n_batch,
        "tokens": n_tok,
        "norm": norm,
        "forward": forward,
        "divided_by": n,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return H, info
