"""Peak training memory, predicted before any training from the config alone.

The model is built on the ``meta`` device (shapes and dtypes, no storage, no weights
read; peft applies every method there too), so parameter counts are exact for the
model the run will train. From those counts and the architecture's config:

    weights       = P   * w                 P: all parameters, w: bytes of model.dtype
                    - P_fz * (w - 2)        under bf16 autocast the frozen fp32 matmul
                                            weights P_fz are stored in bf16 once
    gradients     = P_t * w                 P_t: trainable parameters (.grad, same dtype)
    optimizer     = 2 * P_t * w             AdamW exp_avg + exp_avg_sq, the param's dtype
    autocast      = (P_mm - P_fz) * 2       bf16 copies of the matmul weights (P_mm) that
                                            autocast makes in the forward pass and keeps
                                            for the backward (only float32 weights + bf16)
    activations   = B * T * (L_bw * f_layer + f_embed) * H * a
                                            tensors saved for the backward pass: [B, T, H]
                                            per saved hidden-sized tensor; f_layer counts
                                            them per block (see ``layer_factor``), a is
                                            the bytes per saved element (``activation_bytes``);
                                            L_bw: blocks the backward pass reaches (all L
                                            unless only the last blocks train, see
                                            ``backprop_layers``); f_embed only if L_bw = L
    attention     = L_bw * 2.25 * B * n_heads * T * T * 4
                                            softmax probs + dropout output [B, nh, T, T]
                                            (fp32) + a bool mask: only where attention
                                            runs on PyTorch's math path (CPU with attention
                                            dropout > 0); SDPA flash kernels keep no scores
    logits        = classification: B * C * 4 (negligible)
                    generation: B * T * V * (a_out + 4 + 4): logits [B, T, V], their
                    fp32 copy and the log-softmax saved by the cross-entropy
    runtime       = CPU: the process's RSS after importing torch + transformers
                    (measured once, in this process); CUDA: 0 (max_memory_allocated
                    counts tensors only)

On a CPU the estimate is of live memory; the measured peak RSS matches it under tcmalloc
(peftflow.training.allocator), while glibc malloc's retained, fragmented blocks add up to ~1x more.

There is no separate fp32 master copy: the loop trains the parameters in their own
dtype (float32 unless ``model.dtype: bfloat16``) and bf16 enters only through autocast.
B is the micro-batch (``train.batch_size``), T is ``model.max_length``: the estimate is
for the widest batch (padding "longest" makes most batches narrower). Not modelled:
the backward pass's transient gradients of activations, allocator fragmentation,
evaluation batches, and tokenised data held by the process.

Depends on: config, models.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from peftflow.config import ExperimentConfig
from peftflow.errors import ConfigError
from peftflow.models.backbone import count_parameters, transformer_blocks
from peftflow.models.classifier import SequenceClassifier
from peftflow.training.allocator import loaded_allocator
from peftflow.training.precision import autocasts, frozen_matmul_weights

MIB = 2**20

# Hidden-sized tensors saved for the backward pass per token and block, in units of H,
# counted from the blocks' code (transformers 5, SDPA attention):
#   llama: 2 RMSNorms x (input + normalised) 4H, q/k/v input H, q + k/v after rotary
#          and the attention output 2H + 2H_kv, o_proj input H, MLP input H, gate, up,
#          silu(gate) and their product 4I  ->  9H + 2H_kv + 4I
#   bert:  q/k/v input H, q (scaled), k, v 4H, context H, 2 LayerNorm inputs 2H,
#          FFN input H, intermediate + GELU output 2I, dropout masks ~H  ->  10H + 2I
#   gpt2:  2 LayerNorm inputs 2H, c_attn input H, q/k/v 3H, c_proj input H, MLP input H,
#          tanh-GELU's elementwise chain ~5I + its output I  ->  8H + 6I
# f_embed: the embedding output (and its norm/dropout for BERT/GPT-2) once per token.
EMBED_FACTOR = {"llama": 1.0, "bert": 3.0, "gpt2": 1.5}

# Bytes per saved activation element under bf16 autocast with float32 weights: the
# residual stream, norms and softmax stay float32, matmul inputs/outputs are bf16.
# Measured with tests/test_estimate.py's saved-tensor hooks on the 2-layer models
# (saved bytes under autocast / saved bytes in fp32 x 4, weight copies excluded).
AUTOCAST_ACTIVATION_BYTES = {"llama": 2.9, "bert": 3.2, "gpt2": 2.5}

# Training-time attention dropout, by config attribute name.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")


@dataclass(frozen=True)
class Architecture:
    """What the activation formula needs from the backbone's config."""

    model_type: str
    layers: int  # L
    hidden: int  # H
    intermediate: int  # I
    heads: int  # n_heads
    kv_hidden: int  # H_kv = n_kv_heads * head_dim (H without grouped-query attention)
    vocab: int  # V
    attention_dropout: float


@dataclass(frozen=True)
class ParamCounts:
    total: int  # P (shared tensors once)
    trainable: int  # P_t
    matmul: int  # P_mm: weights of Linear / Conv1D layers (autocast casts these)
    bytes_per_param: int  # w
    # P_fz: frozen fp32 matmul weights the loop stores in bf16 under autocast
    # (training.store_frozen_weights_for_autocast); part of P_mm
    frozen_matmul: int = 0


@dataclass
class MemoryEstimate:
    """Predicted peak training memory, in bytes per component."""

    components: dict[str, float]
    counts: ParamCounts
    architecture: Architecture
    batch_size: int
    seq_len: int
    device: str
    precision: str  # "bf16-autocast", "fp32" or "bf16" (bf16 weights, no autocast)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(self.components.values())

    @property
    def total_mb(self) -> float:
        return self.total_bytes / MIB

    def to_dict(self) -> dict:
        return {
            "components_mb": {k: v / MIB for k, v in self.components.items()},
            "total_mb": self.total_mb,
            "params": asdict(self.counts),
            "architecture": asdict(self.architecture),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "device": self.device,
            "precision": self.precision,
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """Components in MiB and the total, one per line."""
        width = max(len(k) for k in self.components) + 2
        lines = [f"{'component':<{width}}{'MiB':>10}"]
        lines += [f"{k:<{width}}{v / MIB:>10.1f}" for k, v in self.components.items()]
        lines.append(f"{'total':<{width}}{self.total_mb:>10.1f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- counts


def count_params(model: nn.Module) -> ParamCounts:
    """P, P_t and P_mm of a built model (meta or real); shared tensors counted once."""
    trainable, total = count_parameters(model)
    dtype = next((param.dtype for param in model.parameters()), None)
    matmul = sum(
        module.weight.numel()
        for module in model.modules()
        if _is_matmul(module) and isinstance(getattr(module, "weight", None), torch.Tensor)
    )
    itemsize = (dtype or torch.float32).itemsize
    frozen = sum(weight.numel() for weight in frozen_matmul_weights(model))
    return ParamCounts(total, trainable, matmul, itemsize, frozen)


def _is_matmul(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D is a Linear with a transposed weight
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def architecture(config) -> Architecture:
    """L, H, I, heads, H_kv and V from a transformers config (BERT, Llama, GPT-2 names)."""
    hidden = _first(config, ("hidden_size", "n_embd"))
    heads = _first(config, ("num_attention_heads", "n_head"))
    kv_heads = _first(config, ("num_key_value_heads",), heads) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = _first(config, ("intermediate_size", "n_inner"), None) or 4 * hidden
    dropout = next(
        (float(getattr(config, k)) for k in ATTENTION_DROPOUT_KEYS if hasattr(config, k)), 0.0
    )
    return Architecture(
        model_type=config.model_type,
        layers=_first(config, ("num_hidden_layers", "n_layer")),
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_hidden=kv_heads * head_dim,
        vocab=config.vocab_size,
        attention_dropout=dropout,
    )


def transformer_config(model: nn.Module):
    """The transformers config of the backbone inside ``model`` (peft-wrapped or not)."""
    return _backbone(model).config


def _first(config, names: tuple[str, ...], default: object = ...) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is ...:
        raise ValueError(f"{type(config).__name__} has none of {names}")
    return default


def label_logits(model: nn.Module) -> int | None:
    """A classifier's label count (its head's outputs); None for a causal LM (peft-wrapped too)."""
    classifier = next((m for m in model.modules() if isinstance(m, SequenceClassifier)), None)
    return classifier.head.out_features if classifier is not None else None


def backprop_layers(model: nn.Module, layers: int) -> int:
    """L_bw: how many blocks, counted from the top, autograd saves activations for.

    Autograd records only operations that lead to a trainable tensor, so below the
    lowest trainable block nothing is saved. Trainable tensors that feed the input
    (embeddings, prompt/prefix parameters, adapters in every block) mean all L.
    """
    blocks = _blocks(model)
    in_blocks = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    lowest = layers
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in in_blocks:
            lowest = min(lowest, in_blocks[id(param)])
        elif any(key in name for key in ("embed", "wte", "wpe", "prompt", "prefix")):
            return layers
    return layers - lowest


def _backbone(model: nn.Module) -> nn.Module:
    from transformers import PretrainedConfig

    for module in model.modules():
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            return module
    raise ValueError(f"{type(model).__name__} holds no transformers model with a config")


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, also through wrappers (a PeftModel's ``config`` is its base's)."""
    from transformers import PretrainedConfig

    for module in model.modules():
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            try:
                return transformer_blocks(module)
            except ConfigError:
                continue  # a wrapper: look further down
    raise ValueError(f"{type(model).__name__} holds no transformer blocks peftflow knows")


def layer_factor(arch: Architecture) -> float:
    """f_layer: hidden-sized tensors saved per token per block, in units of H (see above)."""
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_hidden
    if arch.model_type == "bert":
        return (10 * h + 2 * i) / h
    if arch.model_type == "gpt2":
        return (8 * h + 6 * i) / h
    return (9 * h + 2 * kv + 4 * i) / h  # llama and other pre-norm gated-MLP decoders


# ------------------------------------------------------------------------ components


def precision_mode(cfg: ExperimentConfig, device_type: str) -> str:
    """What the loop will run: "bf16-autocast", "fp32", or "bf16" (bf16 weights)."""
    if cfg.model.dtype == "bfloat16":
        return "bf16"
    return "bf16-autocast" if autocasts(torch.device(device_type), cfg.train.precision) else "fp32"


def activation_bytes(arch: Architecture, precision: str) -> float:
    """a: bytes per saved activation element."""
    if precision == "bf16-autocast":
        return AUTOCAST_ACTIVATION_BYTES.get(arch.model_type, 3.0)
    return 2.0 if precision == "bf16" else 4.0


def state_bytes(counts: ParamCounts, precision: str = "fp32") -> dict[str, float]:
    """Weights P*w (frozen matmul weights P_fz at 2 bytes under bf16 autocast, as the loop
    stores them), gradients P_t*w and AdamW's two moments 2*P_t*w."""
    w = counts.bytes_per_param
    stored_bf16 = counts.frozen_matmul if precision == "bf16-autocast" and w == 4 else 0
    return {
        "weights": float(counts.total * w - stored_bf16 * (w - 2)),
        "gradients": float(counts.trainable * w),
        "optimizer (AdamW)": float(2 * counts.trainable * w),
    }


def activation_components(
    arch: Architecture,
    counts: ParamCounts,
    batch: int,
    seq_len: int,
    precision: str,
    device_type: str,
    label_logits: int | None = None,
    layers_bw: int | None = None,
) -> dict[str, float]:
    """Activations, attention scores, logits and autocast weight copies for one micro-batch.

    ``label_logits``: a classifier's labels (logits [B, C]); None for a causal LM, which
    scores the vocabulary at every position (logits [B, T, V]).
    """
    a = activation_bytes(arch, precision)
    tokens = batch * seq_len  # B * T
    l_bw = arch.layers if layers_bw is None else layers_bw
    embed = EMBED_FACTOR.get(arch.model_type, 1.0) if l_bw == arch.layers else 0.0
    factor = l_bw * layer_factor(arch) + embed
    parts = {"activations": tokens * factor * arch.hidden * a}  # [B, T, H] x factor
    math_attention = device_type == "cpu" and arch.attention_dropout > 0
    # softmax probs + dropped probs [B, nh, T, T] fp32 + bool mask, per block
    parts["attention scores"] = (
        l_bw * 2.25 * batch * arch.heads * seq_len * seq_len * 4 if math_attention else 0.0
    )
    if label_logits is None:  # logits [B, T, V] (+ fp32 copy + log-softmax, fp32)
        parts["logits"] = tokens * arch.vocab * (min(a, 4.0) + 4 + 4)
    else:  # logits [B, C]
        parts["logits"] = batch * label_logits * 4.0
    autocast_copies = precision == "bf16-autocast" and counts.bytes_per_param == 4
    # Copies only of the weights still stored in fp32 (trainable ones): P_mm - P_fz.
    copied = counts.matmul - counts.frozen_matmul
    parts["autocast weight copies"] = copied * 2.0 if autocast_copies else 0.0
    return parts


# --------------------------------------------------------------------------- runtime


def runtime_baseline_bytes(device_type: str) -> float:
    """CPU: this process's RSS now (torch + transformers imported); CUDA: 0."""
    if device_type == "cuda":
        return 0.0
    import transformers  # noqa: F401  (part of the baseline being measured)

    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return float(pages * os.sysconf("SC_PAGE_SIZE"))


def estimate_device(cfg: ExperimentConfig) -> str:
    wanted = cfg.train.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


# -------------------------------------------------------------------------- entries


def estimate_for_model(
    model: nn.Module,
    cfg: ExperimentConfig,
    batch_size: int | None = None,
    runtime_bytes: float | None = None,
) -> MemoryEstimate:
    """The estimate for ``model`` (meta or real, method applied) trained as ``cfg`` says."""
    device = estimate_device(cfg)
    batch = batch_size or cfg.train.batch_size
    counts = count_params(model)
    arch = architecture(transformer_config(model))
    precision = precision_mode(cfg, device)
    components = state_bytes(counts, precision)
    components.update(
        activation_components(
            arch,
            counts,
            batch,
            cfg.model.max_length,
            precision,
            device,
            label_logits(model),
            backprop_layers(model, arch.layers),
        )
    )
    baseline = runtime_baseline_bytes(device) if runtime_bytes is None else runtime_bytes
    components["runtime (measured)" if device == "cpu" else "runtime"] = baseline
    notes = []
    if device == "cpu":
        notes.append(
            f"runtime = this process's RSS after importing torch + transformers "
            f"({baseline / MIB:.0f} MiB); the measured peak is the process's peak RSS"
        )
        notes.append(allocator_note(loaded_allocator()))
    return MemoryEstimate(
        components, counts, arch, batch, cfg.model.max_length, device, precision, notes
    )


def allocator_note(allocator: str) -> str:
    """What the CPU estimate means under the C allocator this process runs with."""
    if allocator == "tcmalloc":
        return "allocator: tcmalloc, which keeps the process's RSS near the live memory estimated"
    return (
        f"allocator: {allocator}; glibc malloc keeps freed activations resident and fragments, "
        "so over a run the peak RSS can reach about twice this estimate (measured: 1.5-2.2x); "
        "the peftflow command preloads tcmalloc when found (PEFTFLOW_ALLOCATOR, docs/memory.md)"
    )


# ---------------------------------------------------------------------- measurement


class SavedTensorMeter:
    """Bytes of the distinct tensors autograd saves for the backward pass (a trusted measure).

    Use as a context manager around a forward pass; storages are deduplicated and
    the model's own parameters are excluded (they are counted as weights).
    """

    def __init__(self, model: nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())
