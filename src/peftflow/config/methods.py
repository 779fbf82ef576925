"""Each fine-tuning method's own typed settings: ``method`` is a union discriminated by ``name``.

A config says ``method: {name: lora, r: 16, alpha: 32}``: the fields under ``method`` are
those of the named method only, so a run logs and hashes its own method's settings, and
adding a method (one class here, listed in :data:`METHOD_SETTINGS`, and one implementation
in :mod:`peftflow.models.methods.registry`) changes no other run's key.

Besides its settings, each class states what the method is (class variables): its
family, what trains, which model families and tasks it applies to, whether its weights
merge into the base and whether it needs CUDA. The registry in
:mod:`peftflow.models.methods.registry` joins these with the implementations; the method
listing, the docs table and the test matrix derive from it.

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, model_validator

from peftflow.config.sections import Frozen

BOTH_TASKS = frozenset({"classification", "generation"})
BOTH_FAMILIES = frozenset({"encoder", "decoder"})


class MethodSettings(Frozen):
    """What every method declares; subclasses add ``name`` (the tag) and their settings."""

    family: ClassVar[str]  # "full", "selective", "additive" or "reparameterisation"
    trains: ClassVar[str]  # what receives gradients, in words
    model_families: ClassVar[frozenset[str]] = BOTH_FAMILIES
    # classification: a SequenceClassifier (our head); generation: a causal LM
    tasks: ClassVar[frozenset[str]] = BOTH_TASKS
    # the trained weights fold into the base (peft merge_and_unload)
    mergeable: ClassVar[bool] = False
    # refused (before any work) where no CUDA GPU is visible
    requires_cuda: ClassVar[bool] = False


# --- shared groups of settings -------------------------------------------------------------


class _LowRank(MethodSettings):
    """LoRA-family adapters on linear layers (peft's per-architecture targets by default)."""

    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # None: every attention projection of the architecture; else module-name suffixes.
    target_modules: tuple[str, ...] | None = None


class _LoraRank(_LowRank):
    r: int = Field(8, ge=1)


class _VirtualTokens(MethodSettings):
    num_virtual_tokens: int = Field(20, ge=1)


class _PromptEncoder(_VirtualTokens):
    # P-tuning's prompt encoder / prefix tuning's projection width.
    encoder_hidden_size: int = Field(128, ge=1)


class _Bottleneck(MethodSettings):
    """Bottleneck adapters (Houlsby 2019, Pfeiffer 2020, He 2021)."""

    bottleneck: int = Field(64, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class _ParallelBottleneck(_Bottleneck):
    # Output scale of the adapter added to the MLP output.
    scaling: float = Field(4.0, gt=0.0)


# --- the methods ----------------------------------------------------------------------------


class FullSettings(MethodSettings):
    name: Literal["full"] = "full"
    family: ClassVar[str] = "full"
    trains: ClassVar[str] = "every parameter"


class LastLayerSettings(MethodSettings):
    name: Literal["last_layer"] = "last_layer"
    family: ClassVar[str] = "selective"
    trains: ClassVar[str] = "classification head only"
    tasks: ClassVar[frozenset[str]] = frozenset({"classification"})  # a causal LM's is its vocab


class LastBlockSettings(MethodSettings):
    name: Literal["last_block"] = "last_block"
    family: ClassVar[str] = "selective"
    trains: ClassVar[str] = "last transformer block + final norm + head"


class LastNBlocksSettings(MethodSettings):
    name: Literal["last_n_blocks"] = "last_n_blocks"
    n_blocks: int = Field(1, ge=1)
    family: ClassVar[str] = "selective"
    trains: ClassVar[str] = "last n_blocks transformer blocks + final norm + head"


class BitFitSettings(MethodSettings):
    name: Literal["bitfit"] = "bitfit"
    family: ClassVar[str] = "selective"
    trains: ClassVar[str] = "every bias term + head (refused for bias-free models such as Llama)"


class BottleneckAdapterSettings(_Bottleneck):
    name: Literal["bottleneck_adapter"] = "bottleneck_adapter"
    # houlsby: after attention and after the MLP; pfeiffer: after the MLP only.
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    family: ClassVar[str] = "additive"
    trains: ClassVar[str] = (
        "serial bottleneck adapters after attention + MLP (houlsby) or MLP (pfeiffer) + head"
    )


class ParallelAdapterSettings(_ParallelBottleneck):
    name: Literal["parallel_adapter"] = "parallel_adapter"
    family: ClassVar[str] = "additive"
    trains: ClassVar[str] = "scaled bottleneck adapter parallel to every MLP + head"


class LoraSettings(_LoraRank):
    name: Literal["lora"] = "lora"
    family: ClassVar[str] = "reparameterisation"
    trains: ClassVar[str] = "low-rank adapters on attention projections + head"
    mergeable: ClassVar[bool] = True


class DoraSettings(_LoraRank):
    name: Literal["dora"] = "dora"
    family: ClassVar[str] = "reparameterisation"
    trains: ClassVar[str] = (
        "low-rank adapters + per-layer magnitude vectors on attention projections + head"
    )
    mergeable: ClassVar[bool] = True


class AdaLoraSettings(_LowRank):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1)
    target_r: int = Field(4, ge=1)
    # Fractions of the total optimizer steps: rank pruning starts after tinit and
    # ends tfinal before the end; ranks are re-allocated every delta_t steps.
    tinit_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    tfinal_ratio: float = Field(0.2, ge=0.0, lt=1.0)
    delta_t: int = Field(10, ge=1)
    family: ClassVar[str] = "reparameterisation"
    trains: ClassVar[str] = (
        "SVD-form adapters with rank re-allocation on attention projections + head"
    )
    mergeable: ClassVar[bool] = True

    @model_validator(mode="after")
    def _leaves_a_budgeting_phase(self) -> AdaLoraSettings:
        if self.tinit_ratio + self.tfinal_ratio >= 1.0:
            raise ValueError(
                f"tinit_ratio + tfinal_ratio = {self.tinit_ratio + self.tfinal_ratio:g} leaves no "
                "steps for rank re-allocation; keep their sum below 1 (e.g. 0.1 + 0.2)"
            )
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r={self.target_r} exceeds init_r={self.init_r}; AdaLoRA prunes ranks "
                "down to target_r, so choose target_r <= init_r"
            )
        return self


class VeraSettings(MethodSettings):
    name: Literal["vera"] = "vera"
    r: int = Field(256, ge=1)
    target_modules: tuple[str, ...] | None = None
    family: ClassVar[str] = "reparameterisation"
    trains: ClassVar[str] = "scaling vectors around frozen shared random projections + head"
    mergeable: ClassVar[bool] = True


class QLoraSettings(_LoraRank):
    name: Literal["qlora"] = "qlora"
    family: ClassVar[str] = "reparameterisation"
    trains: ClassVar[str] = "low-rank adapters over a 4-bit (NF4) frozen base + head; CUDA only"
    requires_cuda: ClassVar[bool] = True


class IA3Settings(MethodSettings):
    name: Literal["ia3"] = "ia3"
    family: ClassVar[str] = "additive"
    trains: ClassVar[str] = "scaling vectors on keys, values and MLP activations + head"
    mergeable: ClassVar[bool] = True


class LNTuningSettings(MethodSettings):
    name: Literal["ln_tuning"] = "ln_tuning"
    family: ClassVar[str] = "selective"
    trains: ClassVar[str] = "LayerNorm/RMSNorm parameters + head"
    mergeable: ClassVar[bool] = True


class PrefixTuningSettings(_PromptEncoder):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    family: ClassVar[str] = "additive"
    trains: ClassVar[str] = "per-layer key/value prefixes (via an MLP) + head"


class PromptTuningSettings(_VirtualTokens):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    # random: embeddings of random vocabulary tokens; text: the embeddings of init_text.
    init: Literal["random", "text"] = "random"
    init_text: str = "Classify whether this email is spam or ham:"
    family: ClassVar[str] = "additive"
    trains: ClassVar[str] = "virtual-token input embeddings + head"


class PTuningSettings(_PromptEncoder):
    name: Literal["p_tuning"] = "p_tuning"
    family: ClassVar[str] = "additive"
    trains: ClassVar[str] = "virtual tokens from an MLP prompt encoder + head"


class MamAdapterSettings(_PromptEncoder, _ParallelBottleneck):
    name: Literal["mam_adapter"] = "mam_adapter"
    family: ClassVar[str] = "additive"
    trains: ClassVar[str] = "prefix tuning + parallel MLP adapters (Mix-and-Match) + head"


# Registry order: the order of listings, the docs table and a study's all_methods variants.
METHOD_SETTINGS: dict[str, type[MethodSettings]] = {
    cls.model_fields["name"].default: cls
    for cls in (
        FullSettings,
        LastLayerSettings,
        LastBlockSettings,
        LastNBlocksSettings,
        BitFitSettings,
        BottleneckAdapterSettings,
        ParallelAdapterSettings,
        LoraSettings,
        DoraSettings,
        AdaLoraSettings,
        VeraSettings,
        QLoraSettings,
        IA3Settings,
        LNTuningSettings,
        PrefixTuningSettings,
        PromptTuningSettings,
        PTuningSettings,
        MamAdapterSettings,
    )
}

# The ``method`` section: one of the classes above, chosen by its ``name``.
MethodConfig = Annotated[Union[tuple(METHOD_SETTINGS.values())], Field(discriminator="name")]  # noqa: UP007 (a union built from the registry order)


def method_settings(name: str) -> type[MethodSettings]:
    """The settings class of method ``name`` (KeyError for an unknown name)."""
    return METHOD_SETTINGS[name]


def merges_into_base(settings: MethodSettings) -> bool:
    """Whether the trained model can be saved as one plain model (``tracking.model_format:
    merged``): peft folds the adapter in, or the method only changed existing weights."""
    return settings.mergeable or settings.family in ("full", "selective")


def settings_owners(field: str) -> list[str]:
    """The methods that have a setting named ``field`` (for 'did you mean' hints)."""
    return [name for name, cls in METHOD_SETTINGS.items() if field in cls.model_fields]
