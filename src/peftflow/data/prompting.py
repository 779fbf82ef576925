"""Generation prompts: template, truncation and the tokens that carry the loss.

One example becomes ``prompt_ids + response_ids``:

- ``prompt_ids`` = template prefix + the instruction's tokens + the tokens of
  ``\\n\\n<text>`` (cut to a fixed budget) + template suffix, which ends with the
  assistant turn opener (``<|im_start|>assistant\\n`` for ChatML), so generation
  starts right after it. The pieces are cut where byte-level BPE tokenizers
  (SmolLM2, GPT-2) split anyway, so the ids equal those of the whole rendered
  conversation: the blank line is tokenised with the text, not the instruction;
- ``response_ids`` = the target's tokens (cut to ``max_response_tokens``) + the
  end-of-turn id, so a trained model learns to stop.

The text budget does not depend on the target, so a prompt encodes to the same
ids in training, evaluation and serving. Only ``response_ids`` carry loss.

Depends on: config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from peftflow.config import GenerationConfig
from peftflow.errors import ConfigError

_SENTINEL = "\u2063PEFTFLOW_TEXT\u2063"  # never produced by a tokenizer's own template text
PLAIN_SUFFIX = "\n\nResponse:"


@dataclass(frozen=True)
class PromptFormat:
    """The fixed token pieces around every example (all without the tokenizer's own specials)."""

    template: str  # "chat" or "plain"
    prefix_ids: list[int]  # before the instruction (system turn, user turn opener)
    instruction_ids: list[int]  # the instruction; [] without one
    separator: str  # put before each text: a blank line after an instruction, else ""
    suffix_ids: list[int]  # after the text: closes the user turn, opens the assistant turn
    end_id: int  # closes a response; generation stops on it
    text_budget: int  # most text tokens a prompt keeps
    max_response_tokens: int

    @property
    def fixed_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.instruction_ids) + len(self.suffix_ids)


@dataclass
class EncodedGeneration:
    """Token ids per example; ``response_ids`` is empty for inputs without a target."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    text_tokens: list[int]  # the text's token count before truncation
    response_tokens: list[int]  # the target's token count before truncation (no end id)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def lengths(self) -> list[int]:
        """prompt + response tokens per example (what one training row holds)."""
        return [len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids, strict=True)]

    @property
    def n_target_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)


def prompt_format(tokenizer, cfg: GenerationConfig, max_length: int) -> PromptFormat:
    """Build the template pieces for ``tokenizer`` and check they leave room for text."""
    template = _pick_template(tokenizer, cfg.template)
    if template == "chat":
        prefix, suffix = _chat_pieces(tokenizer, cfg.system_prompt)
        leading: list[int] = []  # a chat template writes its own BOS when the model wants one
    else:
        prefix, suffix = "", PLAIN_SUFFIX
        leading = _leading_special_ids(tokenizer)
    instruction = cfg.instruction.strip()
    pieces = PromptFormat(
        template=template,
        prefix_ids=leading + _ids(tokenizer, prefix),
        instruction_ids=_ids(tokenizer, instruction),
        separator="\n\n" if instruction else "",
        suffix_ids=_ids(tokenizer, suffix),
        end_id=end_token_id(tokenizer),
        text_budget=0,
        max_response_tokens=cfg.max_response_tokens,
    )
    budget = max_length - pieces.fixed_tokens - (cfg.max_response_tokens + 1)
    if budget < 1:
        raise ConfigError(
            f"model.max_length={max_length} leaves no room for the text: the prompt template "
            f"takes {pieces.fixed_tokens} tokens and a response up to "
            f"{cfg.max_response_tokens + 1}; raise model.max_length or lower "
            "generation.max_response_tokens"
        )
    return dataclasses.replace(pieces, text_budget=budget)


def _pick_template(tokenizer, requested: str) -> str:
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_chat:
        raise ConfigError(
            "generation.template is 'chat' but this tokenizer has no chat template; "
            "use generation.template: plain (or auto)"
        )
    if requested == "auto":
        return "chat" if has_chat else "plain"
    return requested


def _chat_pieces(tokenizer, system_prompt: str | None) -> tuple[str, str]:
    """Render the chat template around a sentinel and cut it there: (before, after) the text."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": _SENTINEL})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered.count(_SENTINEL) != 1:
        raise ConfigError(
            "the tokenizer's chat template does not place the user message exactly once; "
            "use generation.template: plain, or fix the template in the tokenizer config"
        )
    before, after = rendered.split(_SENTINEL)
    return before, after


def end_token_id(tokenizer) -> int:
    """The id that ends a response: eos (ChatML's <|im_end|>), else BERT-style [SEP]."""
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise ConfigError("the tokenizer has neither an eos nor a sep token to end responses with")


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text by itself (Llama's BOS, BERT's [CLS])."""
    bare = _ids(tokenizer, "x")
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    start = next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), 0)
    return full[:start]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_generation(
    tokenizer,
    fmt: PromptFormat,
    texts: Sequence[str],
    responses: Sequence[str] | None = None,
) -> EncodedGeneration:
    """Texts (and targets, when given) -> prompt and response ids, truncated as documented."""
    text_ids = _batch_ids(tokenizer, [fmt.separator + text for text in texts])
    prompts = [
        fmt.prefix_ids + fmt.instruction_ids + ids[: fmt.text_budget] + fmt.suffix_ids
        for ids in text_ids
    ]
    if responses is None:
        return EncodedGeneration(
            prompts, [[] for _ in prompts], [len(i) for i in text_ids], [0] * len(prompts)
        )
    if len(responses) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(responses)} responses")
    target_ids = _batch_ids(tokenizer, responses)
    targets = [ids[: fmt.max_response_tokens] + [fmt.end_id] for ids in target_ids]
    return EncodedGeneration(
        prompts, targets, [len(i) for i in text_ids], [len(i) for i in target_ids]
    )


def _batch_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=False)
    return [list(ids) for ids in encoded["input_ids"]]
