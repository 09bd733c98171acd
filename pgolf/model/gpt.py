"""The GPT of the Parameter Golf record stacks: embedding features, the block schedule (U-Net skips, depth
recurrence, the two-lane parallel decoder), the tied or untied head with logit softcap, QAT control,
document-bounded attention over packed rows and incremental decoding.

Every feature sits behind a `GPTConfig` field (pgolf/model/config.py); the blocks are in
pgolf/model/layers.py, the input features in pgolf/model/embed.py, document masks in
pgolf/model/doc_attention.py (an optional part, pgolf/optional.py: `optional.get("doc_attention")`).
`GPT.decode` is an incremental decoding path with a KV cache (pgolf/model/decode.py; used by PR #1019's
self-generated GPTQ calibration); the default forward does not use it.

Progressive depth recurrence (PR #1493 / #1611): `GPT.looping_active` is a plain Python attribute, so a
compiled forward guards on it and holds one graph per state. A new model starts with looping on when it has
loops (the state every evaluation, export, calibration and TTT pass of PR #1611 uses). The trainer owns the
switch: at the start of training `model.set_looping(cfg.looping_at(0.0))`, then at the top of each step
`if not model.looping_active and cfg.looping_at(frac): model.set_looping(True)` (once on, it stays on).

Shapes: B batch, T sequence, d model width, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pgolf import optional
from pgolf.model import decode as _decode  # noqa: F401  (registers the optional part `decode`)
from pgolf.model import doc_attention as _doc_attention  # noqa: F401  (registers the optional part `doc_attention`)
from pgolf.model import record_1611 as _record_1611  # noqa: F401  (registers the optional part `model_1611`)
from pgolf.model.config import QAT_MODES, GPTConfig
from pgolf.model.decode import DecodeCache
from pgolf.model.embed import BigramHash, SmearGate, ValueEmbedding
from pgolf.model.layers import Block, CastedLinear, lookup, rms_norm, rope_tables


def softcap_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, cap: float, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of pre-softcap logits z [N,V] against targets [N]: CE(float32(cap*tanh(z/cap))), cap 0 =
    no softcap. This is the exact unfused form of PR #1787's fused softcapped CE (kept by PR #1611): its
    kernel's u = 2cap*sigmoid(2z/cap) = cap*tanh(z/cap) + cap differs by a constant that cancels in
    logsumexp(u) - u_target (tests/test_model_1611.py checks it)."""
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


class GPT(nn.Module):
    """Token ids [B,T] -> logits [B,T,V] (or the cross-entropy given targets); see the module docstring."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.bigram = BigramHash(cfg) if cfg.bigram != "none" else None
        self.smear = None
        if cfg.smear_gate == "gated":
            self.smear = optional.get("model_1611").GatedSmear(cfg.gate_window, cfg.smear_bos_id, cfg.smear_init)
        elif cfg.smear_gate != "none":
            self.smear = SmearGate(d, cfg.smear_gate, cfg.smear_init)
        self.ve_shared = ValueEmbedding(cfg) if cfg.ve_dim > 0 else None
        self.ve_layer_scales = nn.Parameter(torch.ones(len(cfg.ve_layers))) if cfg.ve_layers else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.schedule = cfg.layer_schedule  # the longest (looping) schedule: one KV-cache / LoRA slot per entry
        enc, dec = cfg.encoder_decoder(looping=True)
        self.n_enc = len(enc)
        n_skip = min(len(enc), len(dec))
        self.skip_weights = nn.Parameter(torch.ones(n_skip, d)) if cfg.unet_skips and n_skip else None
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, d)) if cfg.skip_gates and n_skip else None
        self.looping_active = cfg.num_loops > 0
        self.parallel_resid_lambdas = self.parallel_post_lambdas = None
        if cfg.parallel_start_layer > 0:  # allocated for every layer as PR #1530 does; only the lane layers use them
            self.parallel_resid_lambdas = nn.Parameter(torch.full((cfg.num_layers, 2), 1.1))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(cfg.num_layers, 2, 2))
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(d, cfg.vocab_size, zero_init=True)
        self._ve_slot = {layer: i for i, layer in enumerate(cfg.ve_layers)}
        self.qat_mode = "off"
        self.reset_parameters()
        self.set_qat(cfg.qat)
        if cfg.embed_dtype == "bf16":  # the records' policy: built (and initialised) in fp32, tables rounded
            for m in self.embedding_tables():
                m.to(torch.bfloat16)

    def embedding_tables(self) -> list[nn.Embedding]:
        """The embedding tables the model has: token, BigramHash, value embedding."""
        return [self.tok_emb] + [m.embed for m in (self.bigram, self.ve_shared) if m is not None]

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
        if cfg.aux_proj_depth_scale:  # PR #1263: the auxiliary projections' orthogonal init x 1/sqrt(2L)
            with torch.no_grad():
                for m in self.aux_projections():
                    if not m.zero_init and min(m.weight.shape) >= 64:
                        m.weight.mul_(1.0 / math.sqrt(2 * cfg.num_layers))

    def aux_projections(self) -> list[CastedLinear]:
        """The BigramHash and value-embedding projections to model width (those the model has)."""
        return [m.proj for m in (self.bigram, self.ve_shared) if m is not None and m.proj is not None]

    # ---- QAT control ---------------------------------------------------------------------------------
    def quantized_linears(self):
        """The linears the int export quantizes: every block matrix and the bigram/VE projections."""
        return [m for m in self.modules() if isinstance(m, CastedLinear) and m is not self.lm_head]

    def set_qat(self, mode: str, enabled: bool | None = None) -> None:
        """Set the fake-quant mode of `quantized_linears` (`GPTConfig.qat_*` give the quantizer).

        mode "off": never; "always": in every training forward; "late": only once switched on, by
        `enabled=True` (the LateQAT callback; `enabled=False` switches it off again, None keeps the current
        state, which starts off). Fake quantization acts in training mode only. Switching flips a Python
        flag on each linear: a compiled forward recompiles once on the next call. Raises ValueError for an
        unknown mode."""
        if mode not in QAT_MODES:
            raise ValueError(f"qat mode {mode!r} not in {QAT_MODES}")
        if mode == "late":
            on = self.qat_enabled if enabled is None and self.qat_mode == "late" else bool(enabled)
        else:
            on = mode == "always"
        self.qat_mode = mode
        cfg = self.cfg
        for m in self.quantized_linears():
            m.qat, m.qat_bits, m.qat_clip_quantile = on, cfg.qat_bits, cfg.qat_clip_quantile
            m.qat_floor, m.qat_fp16_scale = cfg.qat_scale_floor, cfg.qat_scale_fp16

    @property
    def qat_enabled(self) -> bool:
        """Whether training forwards fake-quantize now (mode "always", or "late" after its switch)."""
        return any(m.qat for m in self.quantized_linears())

    # ---- depth recurrence ----------------------------------------------------------------------------
    def set_looping(self, active: bool) -> None:
        """Switch progressive depth recurrence (`num_loops`) on or off: a Python flag, so a compiled forward
        recompiles once per state (see the module docstring for the trainer's contract). Raises ValueError
        when switching on a model without loops."""
        if active and self.cfg.num_loops == 0:
            raise ValueError("set_looping(True) on a model with num_loops 0")
        self.looping_active = bool(active)

    def virtual_layers(self) -> tuple[list[int], int]:
        """(physical layer of each virtual layer, number of encoder layers) of the current state."""
        enc, dec = self.cfg.encoder_decoder(looping=self.looping_active)
        return enc + dec, len(enc)

    # ---- forward -------------------------------------------------------------------------------------
    def embed(self, idx: torch.Tensor, cache: DecodeCache | None = None) -> torch.Tensor:
        """The blocks' input x0 [B,T,d]: token embedding (+ BigramHash), RMS-normed, with SmearGate before the
        norm (v5, gated) or after it (record)."""
        before_tok = cache.last_token if cache is not None and cache.pos > 0 else None
        dtype = self.blocks[0].attn_scale.dtype  # the tables' rows outside autocast: the blocks' dtype (`lookup`)
        x = lookup(self.tok_emb, idx, dtype)
        if self.bigram is not None:
            x = x + self.bigram(idx, before_tok, dtype)
        if self.smear is not None and self.smear.form in ("v5", "gated"):
            return rms_norm(self._smear(x, idx, cache))
        x = rms_norm(x)
        return self._smear(x, idx, cache) if self.smear is not None else x

    def _smear(self, x: torch.Tensor, idx: torch.Tensor, cache: DecodeCache | None) -> torch.Tensor:
        before = None
        if cache is not None:
            before = cache.smear_in if cache.pos > 0 else None
            cache.smear_in = x[:, -1:].detach()
        if self.smear.form == "gated":
            return self.smear(x, idx, before)
        return self.smear(x, before)

    def _skip(self, k: int, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """x after the U-Net skip of decoder position k (none once the encoder stack is empty)."""
        if self.skip_weights is None or not skips or k >= self.skip_weights.size(0):
            return x
        if self.skip_gates is None:
            return x + self.skip_weights[k].to(x.dtype) * skips.pop()
        scaled = self.skip_weights[k].to(x.dtype) * skips.pop()
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[k].to(x.dtype)))  # g x + (1-g) w s

    def forward_hidden(
        self,
        idx: torch.Tensor,
        lora=None,
        cache: DecodeCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        doc_impl: str = "auto",
    ) -> torch.Tensor:
        """Final-normed hidden states [B,T,d] (before the output projection). With `cache`, idx holds the
        next T tokens after the cached prefix (see `decode`). With `cu_seqlens` (int32 [S+1] over the
        flattened B*T tokens, pgolf/model/varlen.py) no token attends across a segment boundary
        (pgolf/model/doc_attention.py); positions stay row positions (PR #1530). `doc_impl`: auto | mask |
        flex. Raises ValueError for cu_seqlens with a cache, or with an input feature that looks back across
        the boundary unmasked (v5/record SmearGate, BigramHash); LookupError when the optional part
        `doc_attention` is not in this program."""
        cfg = self.cfg
        B, T = idx.shape
        docs = None
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens (document-bounded attention) cannot be combined with a decode cache")
            if self.bigram is not None or (self.smear is not None and self.smear.form != "gated"):
                raise ValueError(
                    "cu_seqlens: BigramHash and the v5/record SmearGate read the previous token across document "
                    "boundaries; document-bounded attention supports smear_gate none or gated"
                )
            docs = optional.get("doc_attention")(cu_seqlens.to(idx.device), B, T, doc_impl)  # a DocumentMask
        x = x0 = self.embed(idx, cache)
        r = cfg.rope_dims or cfg.head_dim
        if cache is None:
            cos, sin = rope_tables(T, r, cfg.rope_base, cfg.rope_ntk_base_len, idx.device)
        else:
            cos, sin = cache.rope(T)
        ve_base = self.ve_shared(idx) if self.ve_shared is not None else None
        schedule, n_enc = self.virtual_layers()
        skips: list[torch.Tensor] = []
        lanes: tuple[torch.Tensor, torch.Tensor] | None = None
        forward_lanes = optional.get("model_1611").forward_lanes if cfg.parallel_start_layer > 0 else None
        for j, li in enumerate(schedule):
            ve = None
            if ve_base is not None and li in self._ve_slot:
                ve = ve_base * self.ve_layer_scales[self._ve_slot[li]].to(ve_base.dtype)
            kv = cache.layers[j] if cache is not None else None
            lo = lora.layer(j) if lora is not None else None
            if j < n_enc:
                x = self.blocks[li](x, x0, cos, sin, ve, lo, kv, docs)
                skips.append(x)
                continue
            if lanes is None and 0 < cfg.parallel_start_layer <= li:  # two lanes from here on (PR #1530)
                lanes = (x, x)
            if lanes is None:
                x = self._skip(j - n_enc, x, skips)
                x = self.blocks[li](x, x0, cos, sin, ve, lo, kv, docs)
            else:
                lane0 = self._skip(j - n_enc, lanes[0], skips)  # the skip goes to the attention lane only
                res, post = self.parallel_resid_lambdas[li], self.parallel_post_lambdas[li]
                lanes = forward_lanes(self.blocks[li], lane0, lanes[1], x0, res, post, cos, sin, ve, lo, kv, docs)
        if lanes is not None:
            lane = cfg.parallel_final_lane
            x = 0.5 * (lanes[0] + lanes[1]) if lane == "mean" else lanes[0] if lane == "attn" else lanes[1]
        if cache is not None:
            cache.advance(idx)
        return rms_norm(x)

    def output_weight(self) -> torch.Tensor:
        """The output projection [V,d]: the token embedding when tied, else the head."""
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return w.float() if w.dtype == torch.bfloat16 else w  # autocast rounds it back to bf16 exactly

    def logits_from_hidden(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B,T,V] of hidden states h [B,T,d], plus an optional bias [V], soft-capped c*tanh(z/c)."""
        z = F.linear(h, self.output_weight())
        if bias is not None:
            z = z + bias
        c = self.cfg.logit_softcap
        return c * torch.tanh(z / c) if c > 0 else z

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        cu_seqlens: torch.Tensor | None = None,
    ):
        """Logits [B,T,V] without targets; else the fp32 cross-entropy of the soft-capped logits (`mean`, or
        per target [B,T] with `none`; `softcap_cross_entropy`). `cu_seqlens`: see `forward_hidden`."""
        h = self.forward_hidden(idx, cu_seqlens=cu_seqlens)
        if targets is None:
            return self.logits_from_hidden(h)
        z = F.linear(h, self.output_weight())
        nll = softcap_cross_entropy(z.flatten(0, 1), targets.flatten(), self.cfg.logit_softcap, reduction)
        return nll.view_as(targets) if reduction == "none" else nll

    def token_nll(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-target negative log-likelihood [B,T] in fp32 (natural log)."""
        return self(idx, targets, reduction="none")

    # ---- incremental decoding ------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, device=None, dtype: torch.dtype = torch.float32) -> DecodeCache:
        """An empty KV cache for up to `max_len` positions: pgolf/model/decode.py `new_cache` (RoPE tables of a
        `max_len`-long forward), the optional part `decode` (LookupError when it is not in this program)."""
        return optional.get("decode").new_cache(self, batch, max_len, device, dtype)

    def decode(self, idx: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Logits [B,T,V] of the next T tokens idx [B,T] after the cached prefix; appends them to the cache."""
        return self.logits_from_hidden(self.forward_hidden(idx, cache=cache))


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
