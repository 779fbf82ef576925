"""Methods implemented with the peft library, applied to a SequenceClassifier or a causal LM.

A causal LM (task "generation") is wrapped whole with ``task_type=CAUSAL_LM``:
peft's own causal-LM wrapper, whose ``generate`` handles every method, virtual
tokens included, and nothing but the method's tensors trains. A classifier
is wrapped in one of two ways, chosen by what peft needs:

- Weight-level methods (LoRA, DoRA, AdaLoRA, IA3, VeRA, LN tuning, QLoRA) wrap the
  whole classifier; ``modules_to_save=["head"]`` makes peft train and save a copy of
  our head next to the adapters.
- Prompt-learning methods (prefix tuning, prompt tuning, P-tuning) need a
  transformers model (they read its config and call it with ``inputs_embeds`` or
  ``past_key_values``), so they wrap only ``model.backbone`` as a feature
  extractor; the classifier keeps its own trainable head. Prompt and P-tuning
  prepend virtual-token positions to the hidden states, which
  ``SequenceClassifier.forward`` drops before pooling.

Every function here builds peft's own config and returns the model to train.

Depends on: config.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftflow.config.methods import (
    AdaLoraSettings,
    DoraSettings,
    IA3Settings,
    LNTuningSettings,
    LoraSettings,
    PrefixTuningSettings,
    PromptTuningSettings,
    PTuningSettings,
    QLoraSettings,
    VeraSettings,
)
from peftflow.errors import ConfigError
from peftflow.models.classifier import backbone_of, has_task_head

# Default LoRA-family targets per backbone type: every attention projection.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "attention.output.dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "attn.c_proj"),
}

# LN tuning targets: peft's table has no BERT entry (BERT names its norms "LayerNorm").
LN_TUNING_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("LayerNorm",),
    "llama": ("input_layernorm", "post_attention_layernorm", "norm"),
    "gpt2": ("ln_1", "ln_2", "ln_f"),
}


def _model_type(model: nn.Module) -> str:
    return backbone_of(model).config.model_type


def _task_settings(model: nn.Module) -> dict:
    """Classifier: peft trains and saves a copy of our head. Causal LM: peft's CAUSAL_LM task."""
    from peft import TaskType

    if has_task_head(model):
        return {"modules_to_save": ["head"]}
    return {"task_type": TaskType.CAUSAL_LM}


def _lora_targets(model: nn.Module, target_modules: tuple[str, ...] | None) -> list[str]:
    targets = target_modules or LORA_TARGETS.get(_model_type(model))
    if not targets:
        raise ConfigError(
            f"no default LoRA targets for model type {_model_type(model)!r}; "
            "set method.target_modules to the names of its linear layers"
        )
    return list(targets)


def _lora_config(model: nn.Module, lora: LoraSettings | DoraSettings | QLoraSettings, **overrides):
    from peft import LoraConfig

    settings = {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _lora_targets(model, lora.target_modules),
        **_task_settings(model),
        "fan_in_fan_out": _model_type(model) == "gpt2",  # GPT-2's Conv1D stores W transposed
    }
    return LoraConfig(**{**settings, **overrides})


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """LoRA (Hu et al. 2021) on the attention projections; the head trains fully."""
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(model, settings))


def apply_dora(model: nn.Module, settings: DoraSettings) -> nn.Module:
    """DoRA (Liu et al. 2024): LoRA plus a trained magnitude vector per target layer."""
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(model, settings, use_dora=True))


# ---------------------------------------------------------------------- AdaLoRA


def apply_adalora(model: nn.Module, settings: AdaLoraSettings) -> nn.Module:
    """AdaLoRA (Zhang et al. 2023): SVD-form adapters whose ranks are re-allocated.

    peft requires ``total_step`` up front, but the number of optimizer steps is
    known only when training starts: a one-step schedule is a placeholder here
    and :func:`adalora_prepare_training` sets the real one.
    """
    from peft import AdaLoraConfig, get_peft_model

    adalora = AdaLoraConfig(
        init_r=settings.init_r,
        target_r=settings.target_r,
        deltaT=settings.delta_t,
        tinit=0,
        tfinal=0,
        total_step=1,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_lora_targets(model, settings.target_modules),
        fan_in_fan_out=_model_type(model) == "gpt2",
        **_task_settings(model),
    )
    return get_peft_model(model, adalora)


def adalora_prepare_training(model: nn.Module, settings: AdaLoraSettings, total_steps: int) -> None:
    """Turn the ratio settings into peft's step schedule for this training run.

    floor(tinit) + floor(tfinal) < total_steps holds because the config keeps
    tinit_ratio + tfinal_ratio < 1, so peft always gets a budgeting phase.
    """
    schedule = model.peft_config["default"]  # the rank allocator reads this same object
    schedule.total_step = total_steps
    schedule.tinit = math.floor(settings.tinit_ratio * total_steps)
    schedule.tfinal = math.floor(settings.tfinal_ratio * total_steps)


def adalora_after_optimizer_step(model: nn.Module, global_step: int) -> None:
    """Score rank importance from the current gradients and mask the least useful ranks."""
    model.base_model.update_and_allocate(global_step)


def adalora_orthogonal_penalty(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser, weighted, as a scalar loss term.

    peft adds it only when the wrapped model returns an output with ``.loss``;
    our classifier returns logits, so the same term is computed here: the mean
    over adapters of ||P P^T - I||_F for each lora_A [r, in] and ||Q^T Q - I||_F
    for each lora_B [out, r].
    """
    weight = model.peft_config["default"].orth_reg_weight
    penalties = []
    for name, param in model.named_parameters():
        if not param.requires_grad or ("lora_A" not in name and "lora_B" not in name):
            continue
        gram = param @ param.T if "lora_A" in name else param.T @ param  # [r, r]
        identity = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        penalties.append(torch.linalg.matrix_norm(gram - identity))
    return weight * torch.stack(penalties).mean()


# ------------------------------------------------------------ other weight methods


def apply_ia3(model: nn.Module, settings: IA3Settings) -> nn.Module:
    """IA3 (Liu et al. 2022): learned scaling vectors on keys, values and the MLP."""
    from peft import IA3Config, get_peft_model
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    model_type = _model_type(model)
    if model_type not in TARGETS:
        raise ConfigError(
            f"peft has no IA3 targets for model type {model_type!r}; use lora or dora instead"
        )
    ia3 = IA3Config(
        target_modules=TARGETS[model_type],
        feedforward_modules=FEEDFORWARD[model_type],
        **_task_settings(model),
        fan_in_fan_out=model_type == "gpt2",
    )
    return get_peft_model(model, ia3)


def apply_vera(model: nn.Module, settings: VeraSettings) -> nn.Module:
    """VeRA (Kopiczko et al. 2024): frozen shared random projections, trained scaling vectors.

    The projections are regenerated from a fixed PRNG key on every apply, so a
    reload that re-applies the method gets the very same ones.
    """
    from peft import VeraConfig, get_peft_model

    vera = VeraConfig(
        r=settings.r,
        target_modules=_lora_targets(model, settings.target_modules),
        fan_in_fan_out=_model_type(model) == "gpt2",
        **_task_settings(model),
    )
    return get_peft_model(model, vera)


def apply_ln_tuning(model: nn.Module, settings: LNTuningSettings) -> nn.Module:
    """LN tuning (Zhao et al. 2023): train only the LayerNorm/RMSNorm parameters + head."""
    from peft import LNTuningConfig, get_peft_model

    model_type = _model_type(model)
    if model_type not in LN_TUNING_TARGETS:
        raise ConfigError(
            f"no LN-tuning targets for model type {model_type!r}; supported: "
            f"{', '.join(sorted(LN_TUNING_TARGETS))}"
        )
    ln_tuning = LNTuningConfig(
        target_modules=list(LN_TUNING_TARGETS[model_type]), **_task_settings(model)
    )
    return get_peft_model(model, ln_tuning)


# ---------------------------------------------------------------------- QLoRA


def require_cuda_for_qlora() -> None:
    """QLoRA's 4-bit kernels (bitsandbytes) run on CUDA only: refuse before any work."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "qlora needs a CUDA GPU (bitsandbytes 4-bit kernels) and none is visible; "
            "use lora on CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "qlora needs bitsandbytes, which is not installed; install the GPU extra: "
            "uv sync --extra gpu (or pip install 'peftflow[gpu]'), or use lora"
        ) from None


def qlora_quantization(settings: QLoraSettings):
    """How QLoRA's base is loaded (Dettmers et al. 2023): NF4 weights, double quantisation,
    bf16 compute, quantised by transformers' bitsandbytes integration in ``from_pretrained``.

    Refuses first without CUDA or bitsandbytes: the base is quantised while it loads.
    """
    from transformers import BitsAndBytesConfig

    require_cuda_for_qlora()

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def apply_qlora(model: nn.Module, settings: QLoraSettings) -> nn.Module:
    """QLoRA: the 4-bit base (loaded so by the task's ``build_base``) + LoRA + head.

    peft's ``prepare_model_for_kbit_training`` freezes the quantised base, keeps its norms
    in float32 and turns on gradient checkpointing (the activations are what is left to
    save). For a classifier that is the backbone; a causal LM is prepared whole.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    require_cuda_for_qlora()
    base = backbone_of(model) if has_task_head(model) else model
    if not getattr(base, "is_loaded_in_4bit", False):
        raise ConfigError(
            "qlora trains over a base loaded in 4 bits, and this one is not: build the model "
            "through the task's build_base, which loads it with the method's quantization"
        )
    prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model.is_loaded_in_4bit = True  # how peft's LoRA picks its 4-bit layer type
    # transformers' 4-bit layers are plain (out, in) Linear4bit, also for GPT-2's Conv1D
    return get_peft_model(model, _lora_config(model, settings, fan_in_fan_out=False))


# ------------------------------------------------------------ prompt learning


def _prompt_task_type(model: nn.Module):
    """Classifier: the backbone is a feature extractor; causal LM: the whole model."""
    from peft import TaskType

    return TaskType.FEATURE_EXTRACTION if has_task_head(model) else TaskType.CAUSAL_LM


def _wrap_backbone(model: nn.Module, prompt_config, prepends_tokens: bool = False) -> nn.Module:
    """Classifier: peft on the backbone only (a feature extractor); the head stays ours and
    trainable. Causal LM: peft on the whole model.

    Methods that prepend virtual tokens (prompt tuning, P-tuning) number positions
    themselves and drop explicit ``position_ids`` (with a warning), so the classifier
    stops passing them; their positions are right only with right padding.
    """
    from peft import get_peft_model

    if not has_task_head(model):  # a causal LM: peft's CAUSAL_LM wrapper, generate() included
        return get_peft_model(model, prompt_config)
    model.backbone = get_peft_model(model.backbone, prompt_config)  # freezes the backbone
    if prepends_tokens:
        model.positions_from_mask = False
    for param in model.head.parameters():
        param.requires_grad_(True)
    return model


def apply_prefix_tuning(model: nn.Module, settings: PrefixTuningSettings) -> nn.Module:
    """Prefix tuning (Li & Liang 2021): trained key/value prefixes in every layer.

    The prefixes come from an MLP (width ``encoder_hidden_size``) over
    learned embeddings, the reparameterisation the paper uses for stable training.
    They enter as ``past_key_values``, so the hidden states keep T positions.
    """
    from peft import PrefixTuningConfig

    prefix = PrefixTuningConfig(
        task_type=_prompt_task_type(model),
        num_virtual_tokens=settings.num_virtual_tokens,
        prefix_projection=True,
        encoder_hidden_size=settings.encoder_hidden_size,
    )
    return _wrap_backbone(model, prefix)


def apply_prompt_tuning(model: nn.Module, settings: PromptTuningSettings) -> nn.Module:
    """Prompt tuning (Lester et al. 2021): trained virtual-token embeddings before the text.

    ``init = "text"`` starts them from the embeddings of ``init_text``
    (tokenised with the model's own tokenizer, repeated/cut to the token count);
    ``"random"`` from the embeddings of random vocabulary tokens (the paper's
    "sampled vocab"): peft's unit-Gaussian RANDOM init lies far off the embedding
    scale (std ~0.02) and barely trains on small budgets.
    """
    from peft import PromptTuningConfig, PromptTuningInit

    text_init = settings.init == "text"
    prompt = PromptTuningConfig(
        task_type=_prompt_task_type(model),
        num_virtual_tokens=settings.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text_init else PromptTuningInit.SAMPLE_VOCAB,
        prompt_tuning_init_text=settings.init_text if text_init else None,
        tokenizer_name_or_path=_tokenizer_location(model) if text_init else None,
    )
    return _wrap_backbone(model, prompt, prepends_tokens=True)


def _tokenizer_location(model: nn.Module) -> str:
    """The folder the backbone came from; it holds the tokenizer peft loads for text init."""
    location = getattr(backbone_of(model).config, "name_or_path", "")
    if not location:
        raise ConfigError(
            "method.init='text' needs the model's tokenizer, but the backbone does "
            "not record where it was loaded from; use method.init='random'"
        )
    return location


def apply_p_tuning(model: nn.Module, settings: PTuningSettings) -> nn.Module:
    """P-tuning (Liu et al. 2021): virtual tokens produced by an MLP prompt encoder."""
    from peft import PromptEncoderConfig

    encoder = PromptEncoderConfig(
        task_type=_prompt_task_type(model),
        num_virtual_tokens=settings.num_virtual_tokens,
        encoder_hidden_size=settings.encoder_hidden_size,
    )
    return _wrap_backbone(model, encoder, prepends_tokens=True)


# ---------------------------------------------------------------------- merging


def merge_for_inference(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights: a plain SequenceClassifier, same logits.

    Only for mergeable methods (the LoRA family, IA3, VeRA, LN tuning); the
    trained head copy replaces the original head.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ConfigError(
            f"{type(model).__name__} carries no mergeable peft adapters; only methods "
            "marked mergeable (peftflow methods --json) can be merged"
        )
    return model.merge_and_unload()
