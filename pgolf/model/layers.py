"""The transformer block family: RMSNorm, the (fake-quantizing) linear, RoPE, attention with XSA, the MLP
and the residual block that combines them (docs/techniques.md#model).

Shapes: B batch, T sequence, d model width, H query heads, Hkv KV heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.config import GPTConfig
from pgolf.model.doc_attention import DocumentMask
from pgolf.quant.numerics import fake_quant_rows


def lookup(table: nn.Embedding, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """table(idx) [*idx.shape, dim]: a bf16 table's rows stay bf16 under autocast (the records' lookups) and
    are read at `dtype` outside it: the dtype of the model's other parameters, fp32 in a CPU fp32 run
    (`GPTConfig.embed_dtype`), bf16 in a bf16 copy of the model (PR #1611's calibration forward,
    `collect_hessians(forward="bf16")`)."""
    e = table(idx)
    if e.dtype == torch.bfloat16 and not torch.is_autocast_enabled(e.device.type):
        e = e.to(dtype)
    return e


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension (any shape [..., d])."""
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear with optional straight-through fake quantization (QAT) of its weight [out, in].

    `qat` is a plain Python flag read in `forward`: while it is False (QAT off, or late QAT before its
    switch) the training forward is a bare `F.linear`, so late QAT costs nothing until it fires. Under
    torch.compile the flag is guarded, so flipping it recompiles the graph once and the compiled forward
    then fake-quantizes (the records' class-level flag was constant-folded instead and never acted:
    records/track_10min_16mb/2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248/README.md). The quantizer
    settings (`qat_bits`, `qat_clip_quantile`, `qat_floor`, `qat_fp16_scale`) are set by `GPT.set_qat`."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.qat = False
        self.qat_bits, self.qat_clip_quantile, self.qat_floor, self.qat_fp16_scale = 6, 1.0, True, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.training and self.qat:
            wq = fake_quant_rows(w, self.qat_bits, self.qat_clip_quantile, self.qat_floor, self.qat_fp16_scale)
            w = w + (wq - w).detach()  # straight-through: the value of wq, the gradient of w
        return F.linear(x, w)


def rope_tables(T: int, dims: int, base: float, ntk_base_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, dims/2]. With NTK scaling the base becomes base*(T/L0)^(r/(r-2)) when T > L0 (PR #549 line)."""
    if ntk_base_len > 0 and T > ntk_base_len:
        base = base * (T / ntk_base_len) ** (dims / (dims - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims))
    ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.size(-1) dims of x [B,T,h,D] with the half-split formula; the rest pass."""
    r = cos.size(-1) * 2
    half = r // 2
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:r], x[..., r:]
    return torch.cat((x1 * c + x2 * s, -x1 * s + x2 * c, rest), dim=-1)


def exclusive_self_attention(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA (arXiv:2603.09078; GQA form of PR #265): remove from each head's output y [B,H,T,D] its component
    along the same position's
    value v [B,Hkv,T,D] of its KV group (GQA form: no repeat of v)."""
    B, H, T, D = y.shape
    Hkv = v.size(1)
    yg = y.view(B, Hkv, H // Hkv, T, D)
    vn = F.normalize(v, dim=-1, eps=1e-12).unsqueeze(2)  # [B,Hkv,1,T,D]
    yg = yg - (yg * vn).sum(-1, keepdim=True) * vn
    return yg.view(B, H, T, D)


class Attention(nn.Module):
    """Causal GQA attention [B,T,d] -> [B,T,d]: q/k RMSNorm, (partial) RoPE, per-head q_gain, XSA on the last
    `xsa_last_n` layers, the sparse output gate; optional value-embedding and LoRA deltas, a KV cache for
    incremental decoding, or document-bounded attention over packed rows (`docs`, a DocumentMask of
    pgolf/model/doc_attention.py).

    Sparse attention output gate (PR #1787, kept by PR #1611): `attn_gate_w` [H, gate_window], zero init;
    per token and head y_h <- sigmoid(scale * attn_gate_w[h] . x[:gate_window]) * y_h, where x is this
    attention's (normed, LN-scaled) input, after XSA and before the output projection (0.5 at init)."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        d, H, Hkv, D = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.H, self.Hkv, self.D = H, Hkv, D
        self.c_q = CastedLinear(d, H * D)
        self.c_k = CastedLinear(d, Hkv * D)
        self.c_v = CastedLinear(d, Hkv * D)
        self.proj = CastedLinear(d, d, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((H,), float(cfg.qk_gain_init)))
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        self.attn_gate_w = nn.Parameter(torch.zeros(H, cfg.gate_window)) if cfg.sparse_attn_gate else None
        self.gate_window, self.gate_scale = cfg.gate_window, float(cfg.sparse_attn_gate_scale)

    def forward(self, x, cos, sin, ve=None, lora=None, kv=None, docs: DocumentMask | None = None):
        B, T, _ = x.shape
        q = self.c_q(x)
        v = self.c_v(x)
        if lora is not None:  # per-sequence low-rank deltas (LoRA TTT, PR #77)
            q = q + lora.delta("q", x)
            v = v + lora.delta("v", x)
        if ve is not None:
            v = v + ve
        q = rms_norm(q.view(B, T, self.H, self.D))
        k = rms_norm(self.c_k(x).view(B, T, self.Hkv, self.D))
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, self.Hkv, self.D).transpose(1, 2)
        if kv is not None:  # incremental decoding: attend to the cached prefix plus these T positions
            k_all, v_all, mask = kv.append(k, v)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=self.Hkv != self.H)
        elif docs is not None:  # packed documents: no attention across a segment boundary (PR #1530)
            y = docs.attend(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.Hkv != self.H)  # [B,H,T,D]
        if self.xsa:
            y = exclusive_self_attention(y, v)
        if self.attn_gate_w is not None:
            g = torch.sigmoid(self.gate_scale * F.linear(x[..., : self.gate_window], self.attn_gate_w.to(x.dtype)))
            y = y * g.transpose(1, 2).unsqueeze(-1)  # [B,T,H] -> [B,H,T,1]
        return self.proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    """[B,T,d] -> [B,T,d]: relu², LeakyReLU(slope)² (PR #549) or SwiGLU (PR #1090), zero-init output projection.

    SwiGLU: hidden = round_up_64(2·mult·d/3), proj(silu(x W_gateᵀ) ⊙ x W_upᵀ); the gate and up matrices are
    one fused `fc` [2·hidden, d] (gate rows first) or, with `swiglu_split`, the separate `gate` and `up`
    [hidden, d] of PR #1090."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.model_dim
        self.act, self.slope = cfg.mlp_act, cfg.leaky_slope
        self.fc = self.gate = self.up = None
        if self.act == "swiglu":
            hidden = int(math.ceil(2 * cfg.mlp_mult * d / 3 / 64) * 64)
            if cfg.swiglu_split:
                self.gate = CastedLinear(d, hidden)
                self.up = CastedLinear(d, hidden)
            else:
                self.fc = CastedLinear(d, 2 * hidden)
        else:
            hidden = int(cfg.mlp_mult * d)
            self.fc = CastedLinear(d, hidden)
        self.proj = CastedLinear(hidden, d, zero_init=True)

    def forward(self, x):
        if self.gate is not None:
            return self.proj(F.silu(self.gate(x)) * self.up(x))
        h = self.fc(x)
        if self.act == "relu2":
            h = F.relu(h).square()
        elif self.act == "leaky_relu2":
            h = F.leaky_relu(h, self.slope).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.proj(h)


class Block(nn.Module):
    """Residual block [B,T,d] -> [B,T,d]: `resid_mix` with the embedding x0, then attention and MLP, each on the
    RMS-normed input times `norm_scale` (1/sqrt(layer+1) of the physical layer with LN scale), sequential or
    parallel (docs/techniques.md#model); pgolf/model/record_1611.py's `forward_lanes` is the two-lane form of
    PR #1530."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        d = cfg.model_dim
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))  # (λ0, λ1)
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.parallel = cfg.parallel_residual

    def forward(self, x, x0, cos, sin, ve=None, lora=None, kv=None, docs=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        n = rms_norm(x) * self.norm_scale
        a = self.attn_scale.to(x.dtype) * self.attn(n, cos, sin, ve, lora, kv, docs)
        if self.parallel:
            return x + a + self.mlp_scale.to(x.dtype) * self.mlp(n)
        x = x + a
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)
