"""Build a policy: a vision-language model and its processor from a local path, with LoRA or QLoRA as flags.

Everything family-specific lives in ``FAMILIES``; the rest goes through ``AutoModelForImageTextToText`` and
``AutoProcessor``. peft and bitsandbytes are imported only when LoRA or quantisation is asked for.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from dip_r1.preflight import MODEL_FLAG, MissingInput, check_model_folder


@dataclass(frozen=True)
class FamilySpec:
    """What the data side needs to know of a model family."""

    coordinates: Literal["absolute", "relative-1000"]
    """How the model writes boxes: pixels of the resized image, or 0..1000 of the image."""
    factor: int = 28
    """Image sides are multiples of this (patch size x spatial merge)."""
    min_pixels: int = 56 * 56
    """Fewest pixels an image is resized to."""
    max_pixels: int = 1280 * 28 * 28
    """Most pixels an image is resized to (bounds the number of image tokens)."""
    vision_prefixes: tuple[str, ...] = ("visual",)
    """Module name parts of the vision tower (frozen, and not quantised, by default)."""


FAMILIES: dict[str, FamilySpec] = {
    "qwen2_vl": FamilySpec(coordinates="relative-1000"),
    "qwen2_5_vl": FamilySpec(coordinates="absolute"),
    "qwen3_vl": FamilySpec(coordinates="relative-1000", factor=32),
    # Qwen3.5 (transformers.models.qwen3_5): Qwen3-VL's vision tower (patch 16, merge 2) and its grounding
    # convention, 0..1000 relative coordinates.
    "qwen3_5": FamilySpec(coordinates="relative-1000", factor=32),
}


def family_of(config) -> FamilySpec:
    """The spec of a transformers config's family; unknown families default to absolute coordinates."""
    spec = FAMILIES.get(getattr(config, "model_type", ""))
    if spec is None:
        warnings.warn(
            f"unknown model family {config.model_type!r}: assuming absolute pixel coordinates", stacklevel=2
        )
        spec = FamilySpec(coordinates="absolute")
    return spec


@dataclass
class LoraSpec:
    """LoRA adapters (peft) on the language model."""

    r: int = 16
    """Rank of the adapters."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Module name suffixes to adapt; None: every linear layer of the language model."""
    train_vision: bool = False
    """Also adapt the vision tower's linear layers (when target_modules is None)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. ``lm_head``)."""


def check_model_path(path: str | Path) -> Path:
    """Fail in one line, before anything is loaded, when a local checkpoint is missing or incomplete
    (:func:`dip_r1.preflight.check_model_folder`)."""
    return check_model_folder(path)


def prepare_model_path(path: str | Path, warm_start: CheckpointBuilder | None) -> Path:
    """The checked model folder at ``path``; when there is none, built first by ``warm_start`` if it may build
    there: at its own ``home`` (the folder a recipe names, e.g. ``TinyPretrain``'s committed base), or anywhere
    with its ``force`` set. A mistyped path never starts a build: it stops with one line instead."""
    p = Path(path).expanduser()
    empty = not p.exists() or (p.is_dir() and not any(p.iterdir()))
    if warm_start is not None and empty:
        home = getattr(warm_start, "home", None)
        if getattr(warm_start, "force", False) or (home is not None and Path(home).resolve() == p.resolve()):
            warm_start.build(p)
        else:
            where = f"only at {home}" if home is not None else "only when asked"
            raise MissingInput(
                "model",
                p,
                f"no such model, and its warm_start builds {where}",
                f"check {MODEL_FLAG}, or build one here with --model.init_args.warm_start.init_args.force true",
            )
    return check_model_path(p)


def has_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a transformers checkpoint."""
    return (Path(path).expanduser() / "config.json").is_file()


def checkpoint_state(state_dict: dict, policy: nn.Module | None, prefix: str = "policy.") -> dict:
    """What a Lightning checkpoint keeps of a module's state: the policy only (never a reference copy), and
    of a LoRA policy only the trainable weights (the frozen base is reloaded from its path)."""
    if policy is not None and is_peft(policy):
        keep = {prefix + n for n, p in policy.named_parameters() if p.requires_grad}
        return {k: v for k, v in state_dict.items() if k in keep}
    return {k: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_processor(path: str | Path):
    """``AutoProcessor.from_pretrained``, or, where torchvision is missing (the video processor cannot be built),
    the family's processor reassembled from its image processor, tokenizer and chat template."""
    from transformers import AutoProcessor, AutoTokenizer, processing_utils

    path = Path(path)
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError, OSError, ValueError, TypeError):
        pass
    import transformers

    name = processor_class(path)
    cls = getattr(transformers, name)
    # An image-only subclass: ProcessorMixin checks and stores exactly the attributes it lists.
    image_only = type(
        name, (cls,), {"get_attributes": classmethod(lambda c: ["image_processor", "tokenizer"])}
    )
    processor = image_only(
        image_processor=image_processor(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        chat_template=chat_template(path),
    )
    assert isinstance(processor, processing_utils.ProcessorMixin)
    return processor


def processor_class(path: str | Path) -> str:
    """The processor class a checkpoint folder names: in ``processor_config.json`` (what transformers writes), else
    in ``preprocessor_config.json`` or ``tokenizer_config.json`` (where the published Qwen folders name it), else the
    class transformers maps the config's ``model_type`` to."""
    path = Path(path)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file() and (cls := json.loads(f.read_text()).get("processor_class")):
            return cls
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in PROCESSOR_MAPPING_NAMES:
        raise ValueError(f"{path} names no processor class, and transformers maps none to {model_type!r}")
    return PROCESSOR_MAPPING_NAMES[model_type]


def image_processor(path: str | Path):
    """``AutoImageProcessor.from_pretrained``, or, when the folder's ``image_processor_type`` is a class transformers
    does not have (the published Qwen2.5-VL folders name ``Qwen2_5_VLImageProcessor``, which transformers 5 does not define),
    the image processor transformers maps the config's ``model_type`` to, read from the same file."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    try:
        return AutoImageProcessor.from_pretrained(path)
    except ValueError:
        classes = IMAGE_PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(path).model_type)
        if not classes:
            raise
    # {"pil": ..., "torchvision": ...}: the PIL one, which needs no torchvision
    name = classes.get("pil") or next(iter(classes.values())) if isinstance(classes, dict) else classes
    return getattr(transformers, name).from_pretrained(path)


def chat_template(path: str | Path) -> str | None:
    """The folder's chat template: ``chat_template.jinja`` (what transformers writes today), or
    ``chat_template.json`` holding ``{"chat_template": ...}`` (what the published Qwen2-VL and Qwen2.5-VL
    folders carry), or None."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    return None


def release_checkpoint_memory(model: nn.Module) -> None:
    """Copy every parameter and buffer that is not quantised out of the checkpoint file's memory map.

    After a quantised load on the CPU, one full-precision tensor still viewing the safetensors map keeps the
    whole file (and every page read while quantising) resident: QLoRA then peaks above plain LoRA.
    """
    import gc

    with torch.no_grad():
        for module in model.modules():
            for _, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if type(t).__name__ not in ("Params4bit", "Int8Params"):
                    t.data = t.data.clone()
    gc.collect()
    try:  # hand the freed heap pages back to the system (glibc only)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def _language_linear_names(model: nn.Module, spec: FamilySpec, include_vision: bool) -> list[str]:
    """Names of the linear layers LoRA adapts: the language model's (and the vision tower's if asked),
    never the output head."""
    names = set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if not is_linear or name.endswith("lm_head"):
            continue
        if not include_vision and any(p in name.split(".") for p in spec.vision_prefixes):
            continue
        names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def load_policy(
    path: str | Path,
    *,
    quantization: Literal["4bit", "8bit"] | None = None,
    lora: LoraSpec | None = None,
    dtype: str | torch.dtype = "float32",
    gradient_checkpointing: bool = False,
    freeze_vision: bool = True,
):
    """Load ``(model, processor)`` from a local checkpoint.

    Args:
        path: folder holding a transformers checkpoint (``config.json``, weights, processor files).
        quantization: ``"4bit"`` (NF4 with double quantisation: QLoRA), ``"8bit"``, or None.
        lora: LoRA adapters to add; None for full fine-tuning (not allowed with quantisation).
        dtype: dtype of the weights and of the 4-bit compute (``"bfloat16"`` on GPUs).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        freeze_vision: keep the vision tower frozen (its weights and any adapters on it).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = check_model_path(path)
    if quantization is not None and lora is None:
        raise ValueError(
            "a quantised model trains only through adapters: give lora=LoraSpec(...) with quantization"
        )
    config = AutoConfig.from_pretrained(path)
    spec = family_of(config)
    kwargs: dict = {"dtype": _dtype(dtype)}
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit",
            load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_dtype(dtype),
            llm_int8_skip_modules=["lm_head", *(rf".*\b{p}" for p in spec.vision_prefixes)],
        )
        if not torch.cuda.is_available():
            kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = load_processor(path)

    if quantization is not None:
        if not torch.cuda.is_available():
            release_checkpoint_memory(model)
        for module in model.modules():
            # bitsandbytes repacks 4-bit weights for CPU inference on the first no-grad eval forward (generation)
            # and its packed path has no backward: keep the trainable layout.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        # What peft's prepare_model_for_kbit_training does, but its cast of every unquantised weight to float32:
        # the frozen embeddings and vision tower would take 4 bytes a parameter (3.9 GB of Qwen2.5-VL-3B's 5.4 GB
        # in memory, against 1.9 GB in bfloat16); they stay in `dtype`, as in a LoRA load.
        for p in model.parameters():
            p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    if lora is not None:
        from peft import LoraConfig, get_peft_model

        targets = lora.target_modules or _language_linear_names(
            model, spec, lora.train_vision and not freeze_vision
        )
        # Restrict to the language model by regex unless the vision tower is adapted too.
        vision = "|".join(spec.vision_prefixes)
        pattern = (
            rf"^(?!.*\b({vision})\b).*\.({'|'.join(targets)})$"
            if not (lora.train_vision and not freeze_vision)
            else rf".*\.({'|'.join(targets)})$"
        )
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=pattern,
                modules_to_save=lora.modules_to_save or None,
                task_type="CAUSAL_LM",
            ),
        )
    elif freeze_vision:
        for name, p in model.named_parameters():
            if any(part in name.split(".") for part in spec.vision_prefixes):
                p.requires_grad_(False)
    return model, processor


@runtime_checkable
class CheckpointBuilder(Protocol):
    """Anything that writes a transformers checkpoint to a folder: the ``warm_start`` of ``GRPOModule`` and
    ``SFTModule``, run when ``policy.path`` holds no checkpoint yet (e.g. ``dip_r1.pretrain.TinyPretrain``,
    ``dip_r1.quickstart.TinySFT``). Named in YAML by ``class_path``.

    A builder may also have ``home`` (the one folder it builds in unasked) and ``force`` (build at any
    path): :func:`prepare_model_path` builds only there, or when forced, never at a path a user mistyped."""

    def build(self, path: str | Path) -> Path:
        """Write the checkpoint to ``path`` and return it."""
        ...


@dataclass
class PolicySpec:
    """Where a policy comes from and how it trains: the arguments of :func:`load_policy`."""

    path: str
    """Local path of a transformers checkpoint (``AutoModelForImageTextToText``)."""
    quantization: Literal["4bit", "8bit"] | None = None
    """``"4bit"`` (QLoRA, NF4) or ``"8bit"`` base weights; None keeps them in ``dtype``."""
    lora: LoraSpec | None = None
    """LoRA adapters to train; None trains every weight (full fine-tuning)."""
    dtype: str = "float32"
    """Weight dtype (``"bfloat16"`` on GPUs, ``"float32"`` on CPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    freeze_vision: bool = True
    """Keep the vision tower frozen."""

    def load(self):
        """``(model, processor)``."""
        return load_policy(
            self.path,
            quantization=self.quantization,
            lora=self.lora,
            dtype=self.dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            freeze_vision=self.freeze_vision,
        )

    def data_spec(self, processor) -> dict:
        """What a DataModule needs of this model: ``datamodule.connect(processor, **spec.data_spec(processor))``.

        Only the coordinate convention: pixel limits and the patch factor are read from the processor itself
        by the prompt builder, unless its own config sets them.
        """
        from transformers import AutoConfig

        return {"coordinates": family_of(AutoConfig.from_pretrained(self.path)).coordinates}


def is_peft(model: nn.Module) -> bool:
    """Whether the model carries peft adapters (its reference is then the base with adapters disabled)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


# Lightning checkpoints store the hyper-parameters, PolicySpec included, and resuming loads them with
# torch.load(weights_only=True): allow these two plain dataclasses.
torch.serialization.add_safe_globals([PolicySpec, LoraSpec])
