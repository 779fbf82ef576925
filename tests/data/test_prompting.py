"""Prompt formatting for generation: template choice, pieces, truncation budget, targets."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from peftflow.config.sections import GenerationConfig
from peftflow.data.prompting import PromptFormat, encode_generation, end_token_id, prompt_format
from peftflow.errors import ConfigError
from tests.conftest import chat_tokenizer as build_chat_tokenizer
from tests.conftest import minilm_folder

LONG_TEXT = " ".join(["quarterly budget review"] * 60)  # 180 words, far over any budget here


@pytest.fixture(scope="module")
def plain_tokenizer():
    """MiniLM's WordPiece tokenizer: no chat template, no eos, [SEP] ends responses."""
    return AutoTokenizer.from_pretrained(str(minilm_folder()))


@pytest.fixture(scope="module")
def chat_tokenizer():
    return build_chat_tokenizer()


def _tokens(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_auto_picks_chat_when_the_tokenizer_has_a_template(chat_tokenizer, plain_tokenizer):
    cfg = GenerationConfig(template="auto")
    assert prompt_format(chat_tokenizer, cfg, 128).template == "chat"
    assert prompt_format(plain_tokenizer, cfg, 128).template == "plain"


def test_plain_can_be_forced_on_a_chat_tokenizer(chat_tokenizer):
    fmt = prompt_format(chat_tokenizer, GenerationConfig(template="plain"), 128)
    assert fmt.template == "plain"
    # plain prompts start with what the tokenizer itself puts first (BERT's [CLS], Llama's BOS)
    assert fmt.prefix_ids == [chat_tokenizer.cls_token_id]


def test_chat_without_a_template_is_a_config_error(plain_tokenizer):
    with pytest.raises(ConfigError, match="no chat template.*generation.template: plain"):
        prompt_format(plain_tokenizer, GenerationConfig(template="chat"), 128)


def test_chat_pieces_are_the_rendered_template_around_the_text(chat_tokenizer):
    cfg = GenerationConfig(template="chat", system_prompt="Be brief.", instruction="Give a title.")
    fmt = prompt_format(chat_tokenizer, cfg, 128)
    assert _tokens(chat_tokenizer, fmt.prefix_ids) == [
        "<|im_start|>",
        "system",
        "be",
        "brief",
        ".",
        "<|im_end|>",
        "<|im_start|>",
        "user",
    ]
    assert _tokens(chat_tokenizer, fmt.instruction_ids) == ["give", "a", "title", "."]
    assert _tokens(chat_tokenizer, fmt.suffix_ids) == ["<|im_end|>", "<|im_start|>", "assistant"]
    assert fmt.end_id == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")

    # The pieces put together encode exactly like the whole conversation rendered at once.
    text = "Lunch with the team on Friday"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Give a title.\n\n{text}"},
    ]
    rendered = chat_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    encoded = encode_generation(chat_tokenizer, fmt, [text])
    assert encoded.prompt_ids[0] == _text_ids(chat_tokenizer, rendered)
    assert chat_tokenizer.decode(encoded.prompt_ids[0]) == chat_tokenizer.decode(
        _text_ids(chat_tokenizer, rendered)
    )


def test_chat_without_system_prompt_starts_with_the_user_turn(chat_tokenizer):
    fmt = prompt_format(chat_tokenizer, GenerationConfig(system_prompt=None), 128)
    assert _tokens(chat_tokenizer, fmt.prefix_ids) == ["<|im_start|>", "user"]


def test_plain_pieces(plain_tokenizer):
    cfg = GenerationConfig(instruction="Write the subject.")
    fmt = prompt_format(plain_tokenizer, cfg, 128)
    assert fmt.prefix_ids == [plain_tokenizer.cls_token_id]
    assert fmt.separator == "\n\n"
    assert _tokens(plain_tokenizer, fmt.instruction_ids) == ["write", "the", "subject", "."]
    assert _tokens(plain_tokenizer, fmt.suffix_ids) == ["response", ":"]
    assert fmt.end_id == plain_tokenizer.sep_token_id == end_token_id(plain_tokenizer)
    prompt = encode_generation(plain_tokenizer, fmt, ["Hello there"]).prompt_ids[0]
    assert plain_tokenizer.decode(prompt) == "[CLS] write the subject. hello there response :"


def test_prompt_is_prefix_instruction_text_suffix(chat_tokenizer):
    fmt = prompt_format(chat_tokenizer, GenerationConfig(), 128)
    text = "Budget review moved to Friday"
    encoded = encode_generation(chat_tokenizer, fmt, [text])
    text_ids = _text_ids(chat_tokenizer, text)
    assert encoded.prompt_ids[0] == (
        fmt.prefix_ids + fmt.instruction_ids + text_ids + fmt.suffix_ids
    )
    assert encoded.text_tokens == [len(text_ids)]


@pytest.mark.parametrize("max_length", [40, 64, 100])
def test_text_budget_and_lengths_fit_max_length(chat_tokenizer, max_length):
    cfg = GenerationConfig(max_response_tokens=5)
    fmt = prompt_format(chat_tokenizer, cfg, max_length)
    assert fmt.text_budget == max_length - fmt.fixed_tokens - (5 + 1)
    encoded = encode_generation(
        chat_tokenizer, fmt, [LONG_TEXT, "short"], [LONG_TEXT, "Short subject"]
    )
    long_ids = _text_ids(chat_tokenizer, LONG_TEXT)
    assert encoded.prompt_ids[0] == (
        fmt.prefix_ids + fmt.instruction_ids + long_ids[: fmt.text_budget] + fmt.suffix_ids
    )
    assert encoded.text_tokens[0] == len(long_ids) > fmt.text_budget
    # the longest target still fits: a full prompt plus a full response is exactly max_length
    assert encoded.lengths[0] == max_length
    assert all(length <= max_length for length in encoded.lengths)
    assert all(len(prompt) <= max_length for prompt in encoded.prompt_ids)
    assert encoded.n_tokens == sum(encoded.lengths)


def test_long_targets_are_cut_and_always_end_with_end_id(plain_tokenizer):
    fmt = prompt_format(plain_tokenizer, GenerationConfig(max_response_tokens=4), 64)
    targets = ["one two three four five six", "hi", ""]
    encoded = encode_generation(plain_tokenizer, fmt, ["a", "b", "c"], targets)
    six = _text_ids(plain_tokenizer, targets[0])
    assert encoded.response_ids == [
        six[:4] + [fmt.end_id],
        _text_ids(plain_tokenizer, "hi") + [fmt.end_id],
        [fmt.end_id],
    ]
    assert encoded.response_tokens == [6, 1, 0]
    assert encoded.n_target_tokens == 5 + 2 + 1


def test_encoding_without_responses_keeps_the_same_prompts(chat_tokenizer):
    fmt = prompt_format(chat_tokenizer, GenerationConfig(max_response_tokens=3), 48)
    texts = [LONG_TEXT, "Team lunch", ""]
    with_targets = encode_generation(chat_tokenizer, fmt, texts, ["a", "b", "c"])
    without = encode_generation(chat_tokenizer, fmt, texts)
    assert without.prompt_ids == with_targets.prompt_ids
    assert without.text_tokens == with_targets.text_tokens
    assert without.response_ids == [[], [], []]
    assert without.response_tokens == [0, 0, 0]
    assert without.n_target_tokens == 0
    assert len(without) == 3


def test_responses_must_match_texts(plain_tokenizer):
    fmt = prompt_format(plain_tokenizer, GenerationConfig(), 128)
    with pytest.raises(ValueError, match="2 texts but 1 responses"):
        encode_generation(plain_tokenizer, fmt, ["a", "b"], ["x"])


def test_encoding_nothing_gives_nothing(plain_tokenizer):
    fmt = prompt_format(plain_tokenizer, GenerationConfig(), 128)
    encoded = encode_generation(plain_tokenizer, fmt, [], [])
    assert len(encoded) == 0
    assert encoded.n_tokens == 0


def test_too_small_max_length_names_the_setting(plain_tokenizer):
    cfg = GenerationConfig(max_response_tokens=4)
    fixed = prompt_format(plain_tokenizer, cfg, 128).fixed_tokens
    smallest = fixed + (4 + 1) + 1  # room for exactly one text token
    assert prompt_format(plain_tokenizer, cfg, smallest).text_budget == 1
    with pytest.raises(ConfigError, match=rf"model\.max_length={smallest - 1}.*raise model"):
        prompt_format(plain_tokenizer, cfg, smallest - 1)


@pytest.mark.parametrize("instruction", ["", "   \n"])
def test_empty_instruction_has_no_instruction_ids(plain_tokenizer, instruction):
    fmt = prompt_format(plain_tokenizer, GenerationConfig(instruction=instruction), 128)
    assert fmt.instruction_ids == []
    assert fmt.separator == ""
    assert fmt.fixed_tokens == len(fmt.prefix_ids) + len(fmt.suffix_ids)
    prompt = encode_generation(plain_tokenizer, fmt, ["Hello"]).prompt_ids[0]
    assert prompt == fmt.prefix_ids + _text_ids(plain_tokenizer, "Hello") + fmt.suffix_ids


def test_prompt_format_is_frozen(plain_tokenizer):
    fmt = prompt_format(plain_tokenizer, GenerationConfig(), 128)
    assert isinstance(fmt, PromptFormat)
    with pytest.raises(AttributeError):
        fmt.text_budget = 1  # type: ignore[misc]
