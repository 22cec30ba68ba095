"""How much accelerator memory a GRPO step takes: arithmetic over a checkpoint's ``config.json`` and a recipe.

No weights are read and nothing is built. Every parameter is counted from the config's sizes (the counts equal
transformers' own models, checked in the tests); bytes follow from how ``load_policy`` keeps them (NF4 with double
quantisation, or the load dtype; LoRA adapters, their gradients and AdamW state in float32; bitsandbytes' 8-bit
AdamW at two bytes a parameter); activations, the rollout's KV cache and the log-prob chunk from the shapes a step
produces (B prompts, G completions each, prompt + T tokens, micro-batches of M completions).

The peak of a step is the persistent memory (weights, adapters, gradients, optimiser state) plus the larger of the
rollout's peak (KV cache of B x G x (prompt + T), the vision tower and the prefill) and the loss's peak (the
scoring activations of one micro-batch, with or without gradient checkpointing, and its ``[M, T, V]`` logits).
It leaves out the CUDA context and the allocator's fragmentation (allow about 1 GB).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes a parameter in bitsandbytes' NF4 with double quantisation: the packed nibble, an 8-bit absmax per 64
weights, a float32 absmax per 256 of those."""
PROMPT_TEXT_TOKENS = 160
"""Tokens of a detection prompt besides the image (chat template, the DIP-R1 system prompt, the request)."""
_CHUNK_ELEMENTS = 1 << 24  # dip_r1.grpo's log-prob chunk, in logits elements


class PlanError(ValueError):
    """A config or recipe the planner cannot read: one line naming it."""


@dataclass(frozen=True)
class Shape:
    """The sizes of a Qwen vision-language checkpoint that decide its memory (from ``config.json``)."""

    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    vision_depth: int
    vision_width: int
    vision_intermediate: int
    vision_out: int
    patch: int
    merge: int
    temporal_patch: int = 2
    deepstack: int = 0
    position_embeddings: int = 0
    linear_layers: int = 0
    """Gated-DeltaNet (linear-attention) layers among ``layers`` (Qwen3.5)."""
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    conv_kernel: int = 4

    @property
    def factor(self) -> int:
        """Pixels of an image side per image token (patch x merge)."""
        return self.patch * self.merge

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        """Read a ``config.json`` dict; :class:`PlanError` for a family the planner does not know."""
        family = config.get("model_type")
        if family not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"):
            raise PlanError(
                f"unknown model family {family!r}: the planner knows qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5"
            )
        text = config.get("text_config") or config
        vision = config.get("vision_config") or {}
        hidden, heads = text["hidden_size"], text["num_attention_heads"]
        types = text.get("layer_types") or []
        linear = sum(t == "linear_attention" for t in types)
        if family == "qwen2_vl":  # Qwen2-VL's vision tower: embed_dim, mlp_ratio, hidden_size = the text's
            width = vision.get("embed_dim", 1280)
            vision_intermediate, out = int(width * vision.get("mlp_ratio", 4)), hidden
        else:
            width, vision_intermediate = vision["hidden_size"], vision["intermediate_size"]
            out = vision.get("out_hidden_size", hidden)
        return cls(
            family=family,
            hidden=hidden,
            intermediate=text["intermediate_size"],
            layers=text["num_hidden_layers"],
            heads=heads,
            kv_heads=text.get("num_key_value_heads", heads),
            head_dim=text.get("head_dim") or hidden // heads,
            vocab=text["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_depth=vision["depth"],
            vision_width=width,
            vision_intermediate=vision_intermediate,
            vision_out=out,
            patch=vision.get("patch_size", 14),
            merge=vision.get("spatial_merge_size", 2),
            temporal_patch=vision.get("temporal_patch_size", 2),
            deepstack=len(vision.get("deepstack_visual_indexes") or []),
            position_embeddings=vision.get("num_position_embeddings", 0) if family != "qwen2_5_vl" else 0,
            linear_layers=linear,
            linear_key_heads=text.get("linear_num_key_heads", 0),
            linear_value_heads=text.get("linear_num_value_heads", 0),
            linear_key_dim=text.get("linear_key_head_dim", 0),
            linear_value_dim=text.get("linear_value_head_dim", 0),
            conv_kernel=text.get("linear_conv_kernel_dim", 4),
        )


def _linear(fan_in: int, fan_out: int) -> tuple[int, int]:
    return (fan_in, fan_out)


def language_linears(s: Shape) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear layer of the language model but the output head (what NF4 quantises and
    LoRA adapts), all layers."""
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    mlp = [_linear(h, s.intermediate), _linear(h, s.intermediate), _linear(s.intermediate, h)]
    gate = 2 if s.family == "qwen3_5" else 1  # Qwen3.5's attention output gate doubles q_proj
    full = [_linear(h, gate * q), _linear(h, kv), _linear(h, kv), _linear(q, h)] + mlp
    kd, vd = s.linear_key_heads * s.linear_key_dim, s.linear_value_heads * s.linear_value_dim
    linear = [
        _linear(h, 2 * kd + vd),  # in_proj_qkv
        _linear(h, vd),  # in_proj_z
        _linear(h, s.linear_value_heads),  # in_proj_b
        _linear(h, s.linear_value_heads),  # in_proj_a
        _linear(vd, h),  # out_proj
    ] + mlp
    return full * (s.layers - s.linear_layers) + linear * s.linear_layers


def parameter_counts(s: Shape) -> dict[str, int]:
    """Parameters by part: ``linear`` (the language model's linear weights), ``language_other`` (their biases,
    norms, linear-attention convolutions and gates), ``embedding``, ``lm_head`` (0 when tied), ``vision``."""
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    linear = sum(i * o for i, o in language_linears(s))
    full, lin = s.layers - s.linear_layers, s.linear_layers
    other = 2 * h * s.layers + h  # two norms a layer, the final norm
    if s.family in ("qwen2_vl", "qwen2_5_vl"):
        other += full * (q + 2 * kv)  # q, k, v biases
    else:
        other += full * 2 * s.head_dim  # q_norm, k_norm
    conv = 2 * s.linear_key_heads * s.linear_key_dim + s.linear_value_heads * s.linear_value_dim
    other += lin * (conv * s.conv_kernel + 2 * s.linear_value_heads + s.linear_value_dim)
    c, i, m = s.vision_width, s.vision_intermediate, s.vision_width * s.merge**2
    block = c * 3 * c + 3 * c + c * c + c  # qkv, proj (with biases)
    if s.family == "qwen2_vl":
        vision = 3 * s.temporal_patch * s.patch**2 * c + s.vision_depth * (block + 2 * c * i + i + c + 4 * c)
        vision += 2 * c + m * m + m + m * s.vision_out + s.vision_out  # merger: LayerNorm, two linears
    elif s.family == "qwen2_5_vl":
        vision = 3 * s.temporal_patch * s.patch**2 * c  # patch embedding, no bias
        vision += s.vision_depth * (block + 3 * c * i + 2 * i + c + 2 * c)  # gated MLP, two RMSNorms
        vision += c + m * m + m + m * s.vision_out + s.vision_out  # merger: RMSNorm, two linears
    else:
        vision = 3 * s.temporal_patch * s.patch**2 * c + c + s.position_embeddings * c
        vision += s.vision_depth * (block + 2 * c * i + i + c + 4 * c)  # MLP, two LayerNorms
        merger = m * m + m + m * s.vision_out + s.vision_out
        vision += 2 * c + merger + s.deepstack * (2 * m + merger)  # deepstack mergers norm the merged width
    return {
        "linear": linear,
        "language_other": other,
        "embedding": s.vocab * h,
        "lm_head": 0 if s.tied else s.vocab * h,
        "vision": vision,
    }


@dataclass(frozen=True)
class StepSettings:
    """What a recipe sets that decides a step's memory (``model.init_args`` / ``data`` / ``trainer``)."""

    quantization: str | None = None
    """``"4bit"``, ``"8bit"`` or None (policy.quantization)."""
    lora_r: int | None = None
    """LoRA rank; None trains every language-model weight."""
    dtype: str = "float32"
    """Weight dtype (policy.dtype)."""
    gradient_checkpointing: bool = False
    prompts: int = 2
    """B: prompts a step (data.batch_size)."""
    group_size: int = 8
    """G: completions a prompt."""
    max_new_tokens: int = 256
    """T: the longest completion."""
    micro_batch_size: int = 8
    """M: completions a scoring forward."""
    share_prompt_prefix: bool = True
    optimizer: str = "torch.optim.AdamW"
    precision: str = "32-true"
    image_tokens: int = 1280
    """Image tokens of the largest image (data max_pixels / factor^2)."""
    prompt_tokens: int | None = None
    """Prompt length; None: ``image_tokens + PROMPT_TEXT_TOKENS``."""
    shards: int = 1
    """Devices FSDP shards weights, gradients and optimiser state over (1: no sharding)."""

    @property
    def prompt_len(self) -> int:
        return (
            self.prompt_tokens if self.prompt_tokens is not None else self.image_tokens + PROMPT_TEXT_TOKENS
        )


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _compute_bytes(settings: StepSettings) -> int:
    """Bytes of an activation: bfloat16 under mixed precision or a 16-bit load, else float32."""
    mixed = str(settings.precision).startswith(("bf16", "16"))
    return 2 if mixed or _DTYPE_BYTES.get(settings.dtype, 4) == 2 else 4


@dataclass
class Plan:
    """Bytes a step needs, by component, and what of it is the peak."""

    components: dict[str, float]
    notes: dict[str, str] = field(default_factory=dict)
    settings: StepSettings = field(default_factory=StepSettings)

    @property
    def persistent(self) -> float:
        c = self.components
        return c["base_weights"] + c["adapters"] + c["gradients"] + c["optimizer_state"]

    @property
    def rollout_peak(self) -> float:
        return self.components["kv_cache"] + self.components["rollout_transient"]

    @property
    def loss_peak(self) -> float:
        c = self.components
        return c["activations_checkpointed" if self.settings.gradient_checkpointing else "activations"]

    @property
    def total(self) -> float:
        return self.persistent + max(self.rollout_peak, self.loss_peak)

    def as_bytes(self) -> dict[str, float]:
        """Every component, the two peaks and the total, in bytes (what ``bench/real_size.py`` compares)."""
        return {
            **self.components,
            "rollout_peak": self.rollout_peak,
            "loss_peak": self.loss_peak,
            "total": self.total,
        }


def _layer_activation_bytes(s: Shape, tokens: int, act: int, lora: bool, linear: bool = False) -> float:
    """Bytes one decoder layer keeps for its backward over ``tokens`` tokens (frozen base, LoRA adapters);
    ``linear``: a Gated-DeltaNet layer (Qwen3.5) instead of full attention."""
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    # norms (float32 input and output), the MLP's gate, up, activation and product
    per_token = 4 * h * 4 + act * 4 * i
    if linear:
        qkv = 2 * s.linear_key_heads * s.linear_key_dim + s.linear_value_heads * s.linear_value_dim
        vd = s.linear_value_heads * s.linear_value_dim
        # transformers' PyTorch chunked delta rule (no flash-linear-attention) keeps about ten float32 copies of
        # q / k / v (l2-normalised, scaled, chunked): measured on Qwen3.5-2B's backward, BENCHMARKS.md
        per_token += 10 * 4 * qkv + act * (2 * qkv + 2 * vd)
        adapted = 6 * h + vd + i  # in_proj_qkv / z / b / a, gate, up; out_proj; down
    else:
        # q / k / v and their rotated copies, attention output
        per_token += act * (2 * (q + kv) + kv + 2 * q)
        adapted = 5 * h + q + i  # q, k, v, gate, up; o; down
    if lora:  # dropout keeps each adapted layer's input (and its mask)
        per_token += (act + 1) * adapted
    return tokens * per_token


def estimate(shape: Shape, settings: StepSettings) -> Plan:
    """The memory of one GRPO step of ``settings`` on a model of ``shape``."""
    st, s = settings, shape
    counts = parameter_counts(s)
    act = _compute_bytes(st)
    wbytes = _DTYPE_BYTES.get(st.dtype, 4)
    rest = counts["language_other"] + counts["embedding"] + counts["lm_head"] + counts["vision"]
    notes = {}
    if st.quantization == "4bit":
        weights = counts["linear"] * NF4_BYTES + rest * wbytes
        notes["base_weights"] = "language linears in NF4, the rest in " + st.dtype
    elif st.quantization == "8bit":
        weights = counts["linear"] * (1 + 4 / 4096) + rest * wbytes
        notes["base_weights"] = "language linears in int8, the rest in " + st.dtype
    else:
        weights = (counts["linear"] + rest) * wbytes
        notes["base_weights"] = "all in " + st.dtype
    if st.lora_r:
        trainable = sum(st.lora_r * (i + o) for i, o in language_linears(s))
        adapters = trainable * 4
        notes["adapters"] = f"LoRA r {st.lora_r} on {len(language_linears(s))} linears, float32"
    else:
        trainable = counts["linear"] + counts["language_other"] + counts["embedding"] + counts["lm_head"]
        adapters = 0.0
        notes["adapters"] = "none: every language weight trains (in base_weights)"
    eight_bit = "8bit" in st.optimizer.lower()
    optimizer = trainable * (2 + 8 / 256 if eight_bit else 8)
    notes["optimizer_state"] = ("8-bit" if eight_bit else "32-bit") + " AdamW moments"
    if "paged" in st.optimizer.lower():
        notes["optimizer_state"] += " (paged: CUDA unified memory, outside max_memory_allocated)"
    gradients = trainable * (4 if st.lora_r else wbytes)
    if st.shards > 1:
        weights, optimizer, gradients = weights / st.shards, optimizer / st.shards, gradients / st.shards
        notes["base_weights"] += f", sharded over {st.shards}"

    n, p, t = st.prompts * st.group_size, st.prompt_len, st.max_new_tokens
    full_layers = s.layers - s.linear_layers
    kv = 2 * full_layers * n * s.kv_heads * (p + t) * s.head_dim * act
    kd, vd = s.linear_key_heads * s.linear_key_dim, s.linear_value_heads * s.linear_value_dim
    conv = (2 * kd + vd) * s.conv_kernel * act
    kv += s.linear_layers * n * (conv + s.linear_value_heads * s.linear_key_dim * s.linear_value_dim * 4)
    notes["kv_cache"] = f"{n} rollouts x {p + t} positions"
    # One at a time: the vision tower (no gradients), a prefill layer, then the prompts' own cache while it is
    # copied into the rollout's, with the sampling's float32 logits.
    patches = st.image_tokens * s.merge**2
    vision = st.prompts * patches * (4 * s.vision_width + 2 * s.vision_intermediate) * act
    prefill = st.prompts * p * (3 * s.hidden + 3 * s.intermediate) * act
    if s.linear_layers:  # the chunked delta rule's float32 copy of q / k / v (measured on Qwen3.5-2B)
        prefill += st.prompts * p * 4 * (2 * kd + vd)
    prefill_cache = 2 * full_layers * st.prompts * s.kv_heads * p * s.head_dim * act
    decode = n * s.vocab * 4 * 3  # the step's logits in float32, the sampling's copies
    rollout = max(vision, prefill, prefill_cache + decode)
    notes["rollout_transient"] = "the largest of the vision tower, a prefill layer, the prompts' cache copy"

    m = min(st.micro_batch_size, n)
    per_row = st.gradient_checkpointing or not st.share_prompt_prefix or st.group_size < 2
    groups = -(-m // st.group_size)
    tokens = m * (p + t) if per_row else groups * p + m * t  # the shared prefix runs each prompt once
    layer = _layer_activation_bytes(s, tokens, act, bool(st.lora_r))
    linear_layer = _layer_activation_bytes(s, tokens, act, bool(st.lora_r), linear=True)
    rows = max(1, _CHUNK_ELEMENTS // max(1, t * s.vocab))
    logits = m * (t + 1) * s.vocab * act
    chunk = 2 * logits + min(rows, m) * t * s.vocab * 4  # the logits, their gradient, one float32 chunk
    edges = tokens * s.hidden * act * 2  # the embeddings' output and the last hidden state
    # The backward starts at the log-probs (logits, their gradient, a chunk), then recomputes the layers one by
    # one: with checkpointing the peak is the layers' inputs and the larger of the two.
    full = full_layers * layer + s.linear_layers * linear_layer + edges + chunk
    largest = max(layer if full_layers else 0, linear_layer if s.linear_layers else 0)
    checkpointed = s.layers * tokens * s.hidden * act + edges + max(largest, chunk)
    notes["activations"] = (
        f"micro-batch of {m}: {tokens} tokens through {s.layers} layers, log-probs included"
    )
    notes["logprob_chunk"] = (
        f"[{m}, {t + 1}, {s.vocab}] logits, their gradient, a float32 chunk (in activations)"
    )
    components = {
        "base_weights": weights,
        "adapters": adapters,
        "gradients": gradients,
        "optimizer_state": optimizer,
        "kv_cache": kv,
        "rollout_transient": rollout,
        "activations": full,
        "activations_checkpointed": checkpointed,
        "logprob_chunk": chunk,
    }
    return Plan(components, notes, st)


KNOBS = (
    ("gradient_checkpointing", "model.init_args.policy.gradient_checkpointing"),
    ("micro_batch_size", "model.init_args.micro_batch_size"),
    ("prompts", "data.batch_size"),
    ("max_new_tokens", "model.init_args.sampling.max_new_tokens"),
    ("image_tokens", "data.prompt_builder.init_args.max_pixels"),
)
"""What to turn first when a step does not fit, and its name in the recipe, in order: free memory first, then
what changes the training least."""


def advice(shape: Shape, settings: StepSettings, budget: float) -> list[tuple[str, object, float]]:
    """``(recipe key, value, total bytes)`` to set, knob by knob in :data:`KNOBS` order, until the step fits
    ``budget``; each knob goes only as far as it must (the largest value that fits, else its floor)."""
    steps, current = [], settings
    for attr, key in KNOBS:
        if estimate(shape, current).total <= budget:
            break
        value = getattr(current, attr)
        if attr == "gradient_checkpointing":
            options = [True] if not value else []
        elif attr in ("max_new_tokens", "image_tokens"):
            options = [v for v in (value * 3 // 4, value // 2, value // 4) if v >= 64]
        else:
            options = list(range(value - 1, 0, -1))
        chosen = None
        for option in options:
            chosen = option
            if estimate(shape, replace(current, **{attr: option})).total <= budget:
                break
        if chosen is None:
            continue
        current = replace(current, **{attr: chosen})
        shown = chosen * shape.factor**2 if attr == "image_tokens" else chosen
        steps.append((key, shown, estimate(shape, current).total))
    return steps
