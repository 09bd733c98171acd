"""The GPT of the Parameter Golf record stacks, every feature behind a `GPTConfig` field (SPEC §5).

Defaults reproduce the baseline (SPEC §5.1): 9 layers, width 512, 8 query / 4 KV heads, MLP 2x relu²,
tied embedding (init std 0.005), logit softcap 30, q/k RMSNorm, per-head q_gain, U-Net skips, resid_mix,
zero-initialised output projections: 17,059,912 parameters. The record-stack features (SPEC §5.2-5.4):
MLP width and activation (relu², LeakyReLU(0.5)², SwiGLU), SmearGate (V5 and record forms), BigramHash
(V5 multiplicative and XOR forms), value embeddings, XSA on the last N layers, partial RoPE with NTK base
scaling, LN scale, QK-gain init, orthogonal init, depth recurrence, parallel residuals, and fake-quant
QAT of the quantized matrices. `GPT.decode` is an incremental decoding path with a KV cache (used by
the AR self-generated GPTQ calibration, SPEC §8.5); the default forward does not use it.

Shapes: B batch, T sequence, d model width, H query heads, Hkv KV heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.quant.numerics import fake_quant_rows

MLP_ACTS = ("relu2", "leaky_relu2", "swiglu")
SMEAR_FORMS = ("none", "v5", "record")
BIGRAM_FORMS = ("none", "v5", "xor")
QAT_MODES = ("off", "late", "always")


@dataclass
class GPTConfig:
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    mlp_act: str = "relu2"  # relu2 | leaky_relu2 | swiglu
    leaky_slope: float = 0.5
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0  # 0 disables
    rope_base: float = 10000.0
    rope_dims: int = 0  # rotated dims per head (even); 0 = the whole head (baseline)
    rope_ntk_base_len: int = 0  # > 0: NTK base scaling for sequences longer than this (reference: 1024)
    qk_gain_init: float = 1.5
    unet_skips: bool = True
    ln_scale: bool = False  # multiply each block's normed inputs by 1/sqrt(layer+1) (PR #315)
    ortho_init: bool = False  # orthogonal init of every non-zero-init linear with both dims >= 64
    smear_gate: str = "none"  # none | v5 (own-token gate, init 3, before the norm) | record (prev-token, init 0)
    smear_init: float | None = None  # None: 3.0 for v5, 0.0 for record
    bigram: str = "none"  # none | v5 ((prev*92821+cur) mod B) | xor (PR #549 form, bucket B-1 for position 0)
    bigram_buckets: int = 4096
    bigram_dim: int = 128
    bigram_scale_init: float = 0.05  # xor form only
    ve_dim: int = 0  # value-embedding width (0 = off); shared table V x ve_dim, projected to Hkv*D
    ve_layers: tuple[int, ...] = ()
    ve_scale_init: float = 0.1
    xsa_last_n: int = 0  # exclusive self-attention on the last N layers (0 = off)
    recur_start: int = 0  # depth recurrence: layers [recur_start, recur_end) run recur_times times in a row
    recur_end: int = 0
    recur_times: int = 1
    parallel_residual: bool = False  # attention and MLP read the same normed input and add in parallel
    qat: str = "off"  # off | late (switched on by a callback) | always (V5: every training forward)
    qat_bits: int = 6
    qat_clip_quantile: float = 1.0  # per-row clip for the fake quant: 1.0 = row max (late QAT), V5 0.9999984
    qat_scale_floor: bool = True  # the reference's scale floor 1/(2^(bits-1)-1) (SPEC §8.1)

    def __post_init__(self):
        self.ve_layers = tuple(int(i) for i in (self.ve_layers or ()))
        d, H, Hkv = self.model_dim, self.num_heads, self.num_kv_heads
        checks = [
            (d % H == 0, f"model_dim {d} must be divisible by num_heads {H}"),
            (H % Hkv == 0, f"num_heads {H} must be divisible by num_kv_heads {Hkv}"),
            ((d // H) % 2 == 0, f"head dim {d // H} must be even for RoPE"),
            (
                self.rope_dims % 2 == 0 and 0 <= self.rope_dims <= d // H,
                f"rope_dims {self.rope_dims} must be even and <= head dim {d // H}",
            ),
            (self.rope_dims != 2 or self.rope_ntk_base_len == 0, "NTK scaling needs rope_dims > 2"),
            (self.mlp_act in MLP_ACTS, f"mlp_act {self.mlp_act!r} not in {MLP_ACTS}"),
            (self.smear_gate in SMEAR_FORMS, f"smear_gate {self.smear_gate!r} not in {SMEAR_FORMS}"),
            (self.bigram in BIGRAM_FORMS, f"bigram {self.bigram!r} not in {BIGRAM_FORMS}"),
            (self.bigram == "none" or self.bigram_buckets >= 2, "bigram_buckets must be >= 2"),
            (self.qat in QAT_MODES, f"qat {self.qat!r} not in {QAT_MODES}"),
            (2 <= self.qat_bits <= 8, f"qat_bits {self.qat_bits} must be in 2..8"),
            (0 <= self.xsa_last_n <= self.num_layers, f"xsa_last_n {self.xsa_last_n} must be in 0..{self.num_layers}"),
            (all(0 <= i < self.num_layers for i in self.ve_layers), f"ve_layers {self.ve_layers} out of range"),
            (self.ve_dim > 0 or not self.ve_layers, "ve_layers given but ve_dim is 0"),
            (self.recur_times >= 1, "recur_times must be >= 1"),
            (
                self.recur_times == 1 or 0 <= self.recur_start < self.recur_end <= self.num_layers,
                f"recurrence span [{self.recur_start}, {self.recur_end}) must lie inside 0..{self.num_layers}",
            ),
            (self.vocab_size > 0 and self.num_layers > 0, "vocab_size and num_layers must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_schedule(self) -> list[int]:
        """Physical block index of each virtual layer (depth recurrence repeats a span)."""
        L, s, e, k = self.num_layers, self.recur_start, self.recur_end, self.recur_times
        if k == 1:
            return list(range(L))
        return list(range(s)) + list(range(s, e)) * k + list(range(e, L))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ve_layers"] = list(self.ve_layers)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {sorted(unknown)}")
        return cls(**dict(d))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear with optional straight-through fake quantization (QAT, SPEC §7.6).

    `qat_alpha` is a tensor buffer, not a Python flag, so switching late QAT on takes effect inside a
    compiled graph (the reference's class flag was constant-folded away: SPEC §11.7)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.qat_mode, self.qat_bits, self.qat_clip_quantile, self.qat_floor = "off", 6, 1.0, True
        self.register_buffer("qat_alpha", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.training and self.qat_mode != "off":
            wq = fake_quant_rows(w, self.qat_bits, self.qat_clip_quantile, self.qat_floor)
            alpha = 1.0 if self.qat_mode == "always" else self.qat_alpha
            w = w + alpha * (wq - w).detach()
        return F.linear(x, w)


def rope_tables(T: int, dims: int, base: float, ntk_base_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, dims/2]. With NTK scaling the base becomes base*(T/L0)^(r/(r-2)) when T > L0 (SPEC §5.3)."""
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
    """XSA (SPEC §5.3): remove from each head's output y [B,H,T,D] its component along the same position's
    value v [B,Hkv,T,D] of its KV group (GQA form: no repeat of v)."""
    B, H, T, D = y.shape
    Hkv = v.size(1)
    yg = y.view(B, Hkv, H // Hkv, T, D)
    vn = F.normalize(v, dim=-1, eps=1e-12).unsqueeze(2)  # [B,Hkv,1,T,D]
    yg = yg - (yg * vn).sum(-1, keepdim=True) * vn
    return yg.view(B, H, T, D)


class Attention(nn.Module):
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

    def forward(self, x, cos, sin, ve=None, lora=None, kv=None):
        B, T, _ = x.shape
        q = self.c_q(x)
        v = self.c_v(x)
        if lora is not None:  # per-sequence low-rank deltas (LoRA TTT, SPEC §4.4)
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
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.Hkv != self.H)  # [B,H,T,D]
        if self.xsa:
            y = exclusive_self_attention(y, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.model_dim
        self.act, self.slope = cfg.mlp_act, cfg.leaky_slope
        if self.act == "swiglu":  # R1090: hidden = round_up_64(2*mult*d/3), gate and up fused in fc
            hidden = int(math.ceil(2 * cfg.mlp_mult * d / 3 / 64) * 64)
            self.fc = CastedLinear(d, 2 * hidden)
        else:
            hidden = int(cfg.mlp_mult * d)
            self.fc = CastedLinear(d, hidden)
        self.proj = CastedLinear(hidden, d, zero_init=True)

    def forward(self, x):
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

    def forward(self, x, x0, cos, sin, ve=None, lora=None, kv=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        n = rms_norm(x) * self.norm_scale
        a = self.attn_scale.to(x.dtype) * self.attn(n, cos, sin, ve, lora, kv)
        if self.parallel:
            return x + a + self.mlp_scale.to(x.dtype) * self.mlp(n)
        x = x + a
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)


class SmearGate(nn.Module):
    """Mix each position with the previous one through a learned per-channel gate g = σ(w).
    v5: out_t = g x_t + (1-g) x_{t-1} (init 3.0); record: out_t = (1-g) x_t + g x_{t-1} (init 0)."""

    def __init__(self, d: int, form: str, init: float | None):
        super().__init__()
        self.form = form
        self.gate = nn.Parameter(torch.full((d,), float(init if init is not None else (3.0 if form == "v5" else 0.0))))

    def forward(self, x, before=None):  # [B,T,d]; `before` [B,1,d]: the input just before x (decoding)
        g = torch.sigmoid(self.gate).to(x.dtype)
        if before is None:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # x_{t-1}, zero at t=0
        else:
            prev = torch.cat((before.to(x.dtype), x[:, :-1]), dim=1)
        return g * x + (1 - g) * prev if self.form == "v5" else (1 - g) * x + g * prev


class BigramHash(nn.Module):
    """Hashed embedding of (previous token, token) pairs added to the token embedding (SPEC §5.2-5.3)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.form, self.B = cfg.bigram, cfg.bigram_buckets
        self.embed = nn.Embedding(self.B, cfg.bigram_dim)
        self.proj = None
        if cfg.bigram_dim != cfg.model_dim:
            # v5: a zero-init projection that stays zero-init; xor: created zero but, lacking the zero-init
            # flag, re-initialised orthogonal by a model-wide ortho init (SPEC §11.3).
            self.proj = CastedLinear(cfg.bigram_dim, cfg.model_dim, zero_init=self.form == "v5")
        self.scale = nn.Parameter(torch.tensor(float(cfg.bigram_scale_init))) if self.form == "xor" else None

    def reset_parameters(self):
        if self.form == "v5":
            nn.init.normal_(self.embed.weight, 0.0, 0.01)
        else:
            nn.init.zeros_(self.embed.weight)
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)

    def indices(self, idx: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """Bucket of each position [B,T]; `before` [B,1] is the token just before idx (decoding), else
        idx starts a sequence."""
        prev = F.pad(idx[:, :-1], (1, 0)) if before is None else torch.cat((before, idx[:, :-1]), dim=1)
        if self.form == "v5":
            return (prev * 92821 + idx) % self.B
        cur, prev = idx.to(torch.int32), prev.to(torch.int32)
        h = torch.bitwise_xor(36313 * cur, 27191 * prev) % (self.B - 1)
        if before is None:
            h[:, 0] = self.B - 1  # reserved bucket for the first position of every sequence/window
        return h.long()

    def forward(self, idx, before=None):
        e = self.embed(self.indices(idx, before))
        if self.proj is not None:
            e = self.proj(e)
        return e * self.scale.to(e.dtype) if self.scale is not None else e


class ValueEmbedding(nn.Module):
    """VE (PR #374): one shared table V x ve_dim projected to the KV width, added to chosen layers' values."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
        self.proj = CastedLinear(cfg.ve_dim, cfg.kv_dim)
        self.scale = nn.Parameter(torch.tensor(float(cfg.ve_scale_init)))

    def reset_parameters(self):
        nn.init.normal_(self.embed.weight, 0.0, 0.01)
        nn.init.zeros_(self.proj.weight)

    def forward(self, idx):  # [B,T] -> [B,T,kv_dim]
        e = self.proj(self.embed(idx))
        return e * self.scale.to(e.dtype)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.bigram = BigramHash(cfg) if cfg.bigram != "none" else None
        self.smear = SmearGate(d, cfg.smear_gate, cfg.smear_init) if cfg.smear_gate != "none" else None
        self.ve_shared = ValueEmbedding(cfg) if cfg.ve_dim > 0 else None
        self.ve_layer_scales = nn.Parameter(torch.ones(len(cfg.ve_layers))) if cfg.ve_layers else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.schedule = cfg.layer_schedule
        self.n_enc = len(self.schedule) // 2 if cfg.unet_skips else 0
        n_skip = min(self.n_enc, len(self.schedule) - self.n_enc)
        self.skip_weights = nn.Parameter(torch.ones(n_skip, d)) if cfg.unet_skips and n_skip else None
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(d, cfg.vocab_size, zero_init=True)
        self._ve_slot = {layer: i for i, layer in enumerate(cfg.ve_layers)}
        self.reset_parameters()
        self.set_qat(cfg.qat)

    def reset_parameters(self):
        cfg = self.cfg
        nn.init.normal_(self.tok_emb.weight, 0.0, cfg.tied_embed_init_std)
        for m in (self.bigram, self.ve_shared):
            if m is not None:
                m.reset_parameters()
        for m in self.modules():
            if isinstance(m, CastedLinear):
                if m.zero_init:
                    nn.init.zeros_(m.weight)
                elif cfg.ortho_init and min(m.weight.shape) >= 64:
                    nn.init.orthogonal_(m.weight, gain=1.0)

    # ---- QAT control ---------------------------------------------------------------------------------
    def quantized_linears(self):
        """The linears the int export quantizes: every block matrix and the bigram/VE projections."""
        return [m for m in self.modules() if isinstance(m, CastedLinear) and m is not self.lm_head]

    def set_qat(self, mode: str, alpha: float | None = None):
        for m in self.quantized_linears():
            m.qat_mode, m.qat_bits = mode, self.cfg.qat_bits
            m.qat_clip_quantile, m.qat_floor = self.cfg.qat_clip_quantile, self.cfg.qat_scale_floor
            if alpha is not None:
                m.qat_alpha.fill_(alpha)

    # ---- forward -------------------------------------------------------------------------------------
    def embed(self, idx: torch.Tensor, cache: DecodeCache | None = None) -> torch.Tensor:
        before_tok = cache.last_token if cache is not None and cache.pos > 0 else None
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx, before_tok)
        if self.smear is not None and self.smear.form == "v5":
            return rms_norm(self._smear(x, cache))
        x = rms_norm(x)
        return self._smear(x, cache) if self.smear is not None else x

    def _smear(self, x: torch.Tensor, cache: DecodeCache | None) -> torch.Tensor:
        if cache is None:
            return self.smear(x)
        before = cache.smear_in if cache.pos > 0 else None
        cache.smear_in = x[:, -1:].detach()
        return self.smear(x, before)

    def forward_hidden(self, idx: torch.Tensor, lora=None, cache: DecodeCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B,T,d] (before the output projection). With `cache`, idx holds the
        next T tokens after the cached prefix (see `decode`)."""
        cfg = self.cfg
        T = idx.size(1)
        x = x0 = self.embed(idx, cache)
        r = cfg.rope_dims or cfg.head_dim
        if cache is None:
            cos, sin = rope_tables(T, r, cfg.rope_base, cfg.rope_ntk_base_len, idx.device)
        else:
            cos, sin = cache.rope(T)
        ve_base = self.ve_shared(idx) if self.ve_shared is not None else None
        skips: list[torch.Tensor] = []
        for j, li in enumerate(self.schedule):
            if self.skip_weights is not None and j >= self.n_enc and skips:
                x = x + self.skip_weights[j - self.n_enc].to(x.dtype) * skips.pop()
            ve = None
            if ve_base is not None and li in self._ve_slot:
                ve = ve_base * self.ve_layer_scales[self._ve_slot[li]].to(ve_base.dtype)
            kv = cache.layers[j] if cache is not None else None
            x = self.blocks[li](x, x0, cos, sin, ve, lora.layer(j) if lora is not None else None, kv)
            if j < self.n_enc:
                skips.append(x)
        if cache is not None:
            cache.advance(idx)
        return rms_norm(x)

    def output_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def logits_from_hidden(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        z = F.linear(h, self.output_weight())
        if bias is not None:
            z = z + bias
        c = self.cfg.logit_softcap
        return c * torch.tanh(z / c) if c > 0 else z

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Logits [B,T,V] without targets; else the fp32 cross-entropy (`mean`, or per target [B,T] with `none`)."""
        logits = self.logits_from_hidden(self.forward_hidden(idx))
        if targets is None:
            return logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
        return nll.view_as(targets) if reduction == "none" else nll

    def token_nll(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-target negative log-likelihood [B,T] in fp32 (natural log)."""
        return self(idx, targets, reduction="none")

    # ---- incremental decoding ------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, device=None, dtype: torch.dtype = torch.float32) -> DecodeCache:
        """An empty KV cache for up to `max_len` positions.

        RoPE: the cache encodes every position with the table of a `max_len`-long forward, so with NTK
        scaling (SPEC §5.3) a cached decode of a `max_len` sequence gives exactly the logits of one full
        forward of that sequence. The reference's cache-less generation instead re-runs the growing prefix,
        whose RoPE base changes once the prefix passes `rope_ntk_base_len` (SPEC §8.5); we keep the base of
        the final length, which is the one the model was trained with when max_len = train seq_len."""
        cfg = self.cfg
        device = device if device is not None else self.tok_emb.weight.device
        r = cfg.rope_dims or cfg.head_dim
        cos, sin = rope_tables(max_len, r, cfg.rope_base, cfg.rope_ntk_base_len, device)
        layers = [
            LayerKV(
                torch.zeros(batch, cfg.num_kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype),
                torch.zeros(batch, cfg.num_kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype),
            )
            for _ in self.schedule
        ]
        return DecodeCache(layers=layers, cos=cos, sin=sin, max_len=max_len)

    def decode(self, idx: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Logits [B,T,V] of the next T tokens idx [B,T] after the cached prefix; appends them to the cache."""
        return self.logits_from_hidden(self.forward_hidden(idx, cache=cache))


class LayerKV:
    """Preallocated keys/values [B,Hkv,max_len,D] of one virtual layer; `pos` positions filled."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v, self.pos = k, v, 0

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B,Hkv,T,D] at the next T positions; return the keys and values of the whole prefix
        and the attention mask (None when one query may see everything before it)."""
        p, T = self.pos, k.size(2)
        if p + T > self.k.size(2):
            raise ValueError(f"decode cache holds {self.k.size(2)} positions; {p} + {T} requested")
        self.k[:, :, p : p + T] = k.to(self.k.dtype)
        self.v[:, :, p : p + T] = v.to(self.v.dtype)
        self.pos = p + T
        mask = None
        if T > 1:  # query i (absolute position p+i) sees keys 0..p+i
            mask = torch.ones(T, p + T, dtype=torch.bool, device=k.device).tril(diagonal=p)
        return self.k[:, :, : p + T].to(k.dtype), self.v[:, :, : p + T].to(v.dtype), mask


@dataclass
class DecodeCache:
    """State of an incremental decode: per-virtual-layer KV, RoPE tables of the full length, and the last
    token and SmearGate input (BigramHash and SmearGate look one position back)."""

    layers: list[LayerKV]
    cos: torch.Tensor
    sin: torch.Tensor
    max_len: int
    pos: int = 0
    last_token: torch.Tensor | None = None
    smear_in: torch.Tensor | None = None

    def rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + T > self.max_len:
            raise ValueError(f"decode cache holds {self.max_len} positions; {self.pos} + {T} requested")
        return self.cos[self.pos : self.pos + T], self.sin[self.pos : self.pos + T]

    def advance(self, idx: torch.Tensor) -> None:
        self.pos += idx.size(1)
        self.last_token = idx[:, -1:]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
