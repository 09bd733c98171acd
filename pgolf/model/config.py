"""`GPTConfig`: every architecture choice of the record stacks as one validated dataclass field
(docs/techniques.md#model).

Defaults reproduce the baseline train_gpt.py: 9 layers, width 512, 8 query / 4 KV heads, MLP 2x relu²,
tied embedding (init std 0.005), logit softcap 30, q/k RMSNorm, per-head q_gain, U-Net skips, resid_mix,
zero-initialised output projections: 17,059,912 parameters. The record-stack
features (1.1556 record; PRs #549/#1019/#1263/#1298):
MLP width and activation (relu², LeakyReLU(0.5)², SwiGLU fused or with separate gate/up matrices),
SmearGate (V5 and record forms), BigramHash (V5 multiplicative and XOR forms), value embeddings, XSA on the
last N layers, partial RoPE with NTK base scaling, LN scale, QK-gain init, orthogonal init (optionally
depth-scaled on the auxiliary projections), depth recurrence, parallel residuals, and fake-quant QAT of the
quantized matrices. The final-leaderboard stack (PR #1611,
records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611, and its lineage
PR #1493 / #1530 / #1667 / #1787 / #1851) adds depth recurrence with progressive activation, gated U-Net
skips, the two-lane parallel residual decoder, the sparse attention output gate and the input-dependent
SmearGate with its BOS mask. The YAML of conf/model/ instantiates this config, never modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MLP_ACTS = ("relu2", "leaky_relu2", "swiglu")
SMEAR_FORMS = ("none", "v5", "record", "gated")
BIGRAM_FORMS = ("none", "v5", "xor")
QAT_MODES = ("off", "late", "always")
PARALLEL_FINAL_LANES = ("mean", "attn", "mlp")
EMBED_DTYPES = ("fp32", "bf16")


@dataclass
class GPTConfig:
    """The network's hyper-parameters; `__post_init__` raises ValueError naming the first inconsistent field.

    Switches with a record behind them (defaults keep pgolf's earlier behaviour):

    - `swiglu_split`: with `mlp_act: swiglu`, the gate and up projections are two [hidden, d] matrices
      `mlp.gate` and `mlp.up` (each orthogonal-initialised and orthogonalised by Muon on its own, with its
      own shape scale sqrt(max(1, hidden/d))), as PR #1090 has them; False: one fused [2·hidden, d] `mlp.fc`.
      Same parameter count and the same function of the weights; the initial scale and Muon's update differ.
    - `aux_proj_depth_scale`: multiply the orthogonal init of `bigram.proj` and `ve_shared.proj` by
      1/sqrt(2·num_layers) (singular values 0.2132 at 11 layers; PR #1263, and PR #1090's bigram projection,
      whose init scales every `*.proj`); False: gain 1 (PR #549, PR #1298). Needs `ortho_init`.
    - QAT (`qat`: off | late | always): straight-through fake quantization of every quantized matrix in
      training forwards, row-wise symmetric int`qat_bits`: row scale s_r = clip_r / (2^(bits-1)-1) where
      clip_r is the row's max |w| (`qat_clip_quantile` 1.0) or that quantile of |w| (V5: 0.9999984), in
      units of the weight. `qat_scale_floor`: s_r >= 1/(2^(bits-1)-1) (1/31 for int6), the floor of the
      int6/int8 exports; False: no floor (s_r >= 1e-12 only, so an all-zero row stays zero).
      `qat_scale_fp16`: s_r rounded to fp16 as the artifact stores it; False: the fp32 scale. The V5 record
      (records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd) trains with no floor and the fp32
      scale (`qat_scale_floor: false`, `qat_scale_fp16: false`); the floor is only in its export. On a
      512x512 N(0, 1/512) matrix that zeroes about 4.3% of the entries, the floored fp16 form about 28.5%.

    The PR #1611 stack (each off by default; docs/records.md#record_1611):

    - Depth recurrence with progressive activation (`num_loops` > 0; PR #1493 line): the physical layers
      [loop_start..loop_end] (inclusive) run `num_loops` extra times, so the virtual sequence is
      [0..loop_start-1] + [loop_start..loop_end] x (num_loops+1) + [loop_end+1..L-1]; its first half (rounded
      down) is the encoder, the rest the decoder. It acts only while `GPT.looping_active` (a Python flag, so a
      compiled forward has one graph per state); otherwise the plain split of range(L) is used. Training
      switches it on at the training fraction `enable_looping_at` (`looping_at`). Exclusive with `recur_*`
      (the static recurrence of earlier records).
    - `skip_gates`: U-Net skips as a lerp x <- g x + (1-g) (skip_weights[j] s), g = sigmoid(skip_gates[j]),
      skip_gates initialised 0 (PR #1611); False: x <- x + skip_weights[j] s.
    - `parallel_start_layer` > 0: from the first decoder position whose physical layer is >= this, two lanes
      (PR #1530): attention reads lane0 mixed with x0, the MLP reads lane1, each writes both lanes through
      the learned `parallel_post_lambdas` [L,2,2] (init 1) on top of `parallel_resid_lambdas` [L,2]
      (init 1.1); skips go to lane0; the output is `parallel_final_lane` (mean of the lanes, or one lane).
    - `sparse_attn_gate` (PR #1787): per head y_h <- sigmoid(scale * W_g[h] . u[:gate_window]) y_h after
      XSA, W_g = `attn_gate_w` [H, gate_window] zero-initialised, u the attention's normed input.
    - `smear_gate: gated` (PR #1667 with the PR #1851 BOS fix): on the raw embeddings,
      e_t <- e_t + lambda sigmoid(w . e_t[:gate_window]) e_{t-1} [id_t != smear_bos_id], w [1, gate_window]
      and lambda (`smear_init`, default 0) zero-initialised; `smear_bos_id` -1 drops the mask (PR #1667).
    - `embed_dtype: bf16`: the records' precision policy (every record from the baseline to PR #1611 builds
      the model in bf16 and restores all but the embedding tables to fp32): the token, BigramHash and value
      embedding tables are bf16 parameters, initialised in fp32 and rounded, stepped by fused AdamW with bf16
      moments. Under autocast their lookups stay bf16 as in the records; outside it (CPU fp32 runs) they
      are read in fp32, and the tied output projection is always read in fp32 (under autocast that is the
      same bf16 matmul and the same bf16 gradient).
    """

    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    mlp_act: str = "relu2"  # relu2 | leaky_relu2 | swiglu
    swiglu_split: bool = False  # swiglu only: separate gate/up matrices (PR #1090) instead of one fused fc
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
    aux_proj_depth_scale: bool = False  # bigram/VE projections' orthogonal init x 1/sqrt(2*num_layers) (PR #1263)
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
    qat_scale_floor: bool = True  # row scale >= 1/(2^(bits-1)-1), the int exports' floor; V5 trains without it
    qat_scale_fp16: bool = True  # row scale rounded to fp16 as the artifact stores it; V5 trains with fp32
    num_loops: int = 0  # depth recurrence with progressive activation: extra passes over [loop_start..loop_end]
    loop_start: int = 0
    loop_end: int = 0  # inclusive (PR #1493 / #1611: layers 3..5)
    enable_looping_at: float = 0.0  # training fraction at which looping switches on (PR #1611: 0.35)
    skip_gates: bool = False  # sigmoid-gated lerp U-Net skips (PR #1611)
    parallel_start_layer: int = 0  # > 0: two-lane parallel decoder from this physical layer (PR #1530); 0 = off
    parallel_final_lane: str = "mean"  # mean | attn | mlp: the hidden state after the last two-lane block
    sparse_attn_gate: bool = False  # per-head sigmoid gate of the attention output (PR #1787)
    sparse_attn_gate_scale: float = 1.0  # PR #1611 runs 0.5
    gate_window: int = 12  # input channels the sparse attention gate and the gated SmearGate read
    smear_bos_id: int = 1  # gated SmearGate: no smear into this token (PR #1851); -1 = no mask (PR #1667)
    embed_dtype: str = "fp32"  # fp32 | bf16: the embedding tables' parameter dtype (the records': bf16)

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
            (self.mlp_mult * d >= 1, f"mlp_mult {self.mlp_mult} must make the MLP width mlp_mult * model_dim >= 1"),
            (not self.swiglu_split or self.mlp_act == "swiglu", "swiglu_split needs mlp_act swiglu"),
            (
                not self.aux_proj_depth_scale or self.ortho_init,
                "aux_proj_depth_scale needs ortho_init",
            ),
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
            (self.num_loops >= 0, f"num_loops {self.num_loops} must be >= 0"),
            (
                self.num_loops == 0 or 0 <= self.loop_start <= self.loop_end < self.num_layers,
                f"loop span [{self.loop_start}..{self.loop_end}] must satisfy 0 <= loop_start <= loop_end "
                f"< num_layers {self.num_layers}",
            ),
            (
                self.num_loops == 0 or self.recur_times == 1,
                "num_loops and recur_times are two forms of depth recurrence; use one",
            ),
            (0.0 <= self.enable_looping_at <= 1.0, f"enable_looping_at {self.enable_looping_at} must be in [0, 1]"),
            (self.rope_base >= 1, f"rope_base {self.rope_base} must be >= 1"),
            (self.logit_softcap >= 0, f"logit_softcap {self.logit_softcap} must be >= 0 (0 disables)"),
            (not self.skip_gates or self.unet_skips, "skip_gates needs unet_skips"),
            (
                0 <= self.parallel_start_layer < self.num_layers,
                f"parallel_start_layer {self.parallel_start_layer} must be in 0..{self.num_layers - 1} (0 = off)",
            ),
            (
                self.parallel_start_layer == 0 or not self.parallel_residual,
                "parallel_residual and parallel_start_layer are two forms of parallel blocks; use one",
            ),
            (
                self.parallel_final_lane in PARALLEL_FINAL_LANES,
                f"parallel_final_lane {self.parallel_final_lane!r} not in {PARALLEL_FINAL_LANES}",
            ),
            (
                not (self.sparse_attn_gate or self.smear_gate == "gated") or 1 <= self.gate_window <= d,
                f"gate_window {self.gate_window} must be in 1..model_dim {d}",
            ),
            (self.smear_bos_id >= -1, f"smear_bos_id {self.smear_bos_id} must be a token id or -1 (no mask)"),
            (self.embed_dtype in EMBED_DTYPES, f"embed_dtype {self.embed_dtype!r} not in {EMBED_DTYPES}"),
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
        """Physical block index of each virtual layer (depth recurrence repeats a span). With `num_loops`,
        the looping schedule (the longest, used once looping is active and at evaluation): PR #1611's
        [0,1,2,3,4,5,3,4,5,3,4,5,6,7,8,9,10]."""
        L = self.num_layers
        if self.num_loops > 0:
            s, e = self.loop_start, self.loop_end + 1
            return list(range(s)) + list(range(s, e)) * (self.num_loops + 1) + list(range(e, L))
        s, e, k = self.recur_start, self.recur_end, self.recur_times
        if k == 1:
            return list(range(L))
        return list(range(s)) + list(range(s, e)) * k + list(range(e, L))

    def encoder_decoder(self, looping: bool = True) -> tuple[list[int], list[int]]:
        """(encoder, decoder) physical layer lists of the U-Net split: the schedule's first half (rounded
        down) and the rest; with `num_loops` and `looping` False, the plain split of range(num_layers).
        Without `unet_skips` the encoder is empty. PR #1611 looping: [0,1,2,3,4,5,3,4] / [5,3,4,5,6,7,8,9,10];
        not looping: [0..4] / [5..10]."""
        sched = self.layer_schedule if looping or self.num_loops == 0 else list(range(self.num_layers))
        n_enc = len(sched) // 2 if self.unet_skips else 0
        return sched[:n_enc], sched[n_enc:]

    def looping_at(self, frac: float) -> bool:
        """Whether depth recurrence is active at training fraction `frac` (elapsed / budget, 0..1):
        num_loops > 0 and frac >= enable_looping_at (PR #1611: the first step with frac >= 0.35)."""
        return self.num_loops > 0 and frac >= self.enable_looping_at

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
