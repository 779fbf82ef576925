"""Generation metrics against values worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from peftflow.evaluation.text_metrics import (
    bleu_signature,
    exact_match,
    generation_metrics,
    rouge_l,
    rouge_n,
    samples_table,
    tokens_for_rouge,
)

# Pair A: repeated words, so ROUGE-N must clip counts.
#   pred tokens: the the the cat   (4)     ref tokens: the cat sat   (3)
PAIR_A = ("the the the cat", "the cat sat")
# Pair B: punctuation and case are dropped by the tokenizer.
#   pred tokens: meeting moved to friday   (4)
#   ref tokens:  meeting moved to next friday   (5)
PAIR_B = ("Meeting moved to Friday!", "meeting: moved to NEXT friday")
# Pair C: same words, other order: ROUGE-1 is perfect, ROUGE-L is not.
PAIR_C = ("b a c", "a b c")


def test_tokens_for_rouge_lowercases_and_splits_on_non_alphanumerics():
    assert tokens_for_rouge("Don't PANIC\u2014re-send v2.0!") == [
        "don",
        "t",
        "panic",
        "re",
        "send",
        "v2",
        "0",
    ]
    assert tokens_for_rouge("Caf\u00e9  \n\tlatte") == ["caf", "latte"]  # é is not [a-z0-9]
    assert tokens_for_rouge(" ?! ") == []


def test_rouge1_clips_repeated_words():
    # pred counts {the: 3, cat: 1}, ref counts {the: 1, cat: 1, sat: 1}
    # clipped overlap = min(3, 1) + min(1, 1) = 2
    # P = 2/4, R = 2/3, F = 2 * (1/2) * (2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert rouge_n(*PAIR_A, n=1) == pytest.approx(4 / 7)


def test_rouge2_clips_repeated_bigrams():
    # pred bigrams: (the the) x2, (the cat)  -> 3;  ref bigrams: (the cat), (cat sat) -> 2
    # overlap = 1 (the cat); P = 1/3, R = 1/2, F = 2 * (1/6) / (5/6) = 2/5
    assert rouge_n(*PAIR_A, n=2) == pytest.approx(2 / 5)


def test_rouge_l_on_repeated_words():
    # LCS(the the the cat, the cat sat) = "the cat" = 2; P = 2/4, R = 2/3 -> F = 4/7
    assert rouge_l(*PAIR_A) == pytest.approx(4 / 7)


def test_rouge_ignores_case_and_punctuation():
    # ROUGE-1: overlap 4 (all pred tokens); P = 4/4, R = 4/5, F = 2 * 0.8 / 1.8 = 8/9
    assert rouge_n(*PAIR_B, n=1) == pytest.approx(8 / 9)
    # ROUGE-2: pred (meeting moved) (moved to) (to friday) -> 3
    #          ref  (meeting moved) (moved to) (to next) (next friday) -> 4
    # overlap 2; P = 2/3, R = 2/4, F = 2 * (1/3) / (7/6) = 4/7
    assert rouge_n(*PAIR_B, n=2) == pytest.approx(4 / 7)
    # ROUGE-L: LCS = meeting moved to friday = 4 -> same as ROUGE-1, 8/9
    assert rouge_l(*PAIR_B) == pytest.approx(8 / 9)


def test_rouge_l_is_order_sensitive_where_rouge1_is_not():
    # ROUGE-1: all 3 words match -> 1.0
    assert rouge_n(*PAIR_C, n=1) == pytest.approx(1.0)
    # ROUGE-2: pred (b a) (a c), ref (a b) (b c): no overlap -> 0
    assert rouge_n(*PAIR_C, n=2) == 0.0
    # ROUGE-L: LCS(b a c, a b c) = 2 ("a c" or "b c"); P = R = 2/3 -> F = 2/3
    assert rouge_l(*PAIR_C) == pytest.approx(2 / 3)


def test_rouge_is_zero_without_ngrams_on_either_side():
    assert rouge_n("", "the cat", 1) == 0.0
    assert rouge_n("the cat", "?!", 1) == 0.0
    assert rouge_n("cat", "cat", 2) == 0.0  # one word has no bigram
    assert rouge_l("", "the cat") == 0.0
    assert rouge_n("The cat.", "the CAT", 1) == 1.0


def test_rouge_n_rejects_n_below_one():
    with pytest.raises(ValueError, match="n >= 1"):
        rouge_n("a", "a", 0)


def test_corpus_bleu_matches_hand_computation():
    predictions = ["the cat sat on the mat", "a dog barked loudly"]
    references = ["the cat sat on a mat", "a dog barked very loudly today"]
    # Sentence 1 (6 hyp words vs ref "the cat sat on a mat"):
    #   1-grams: the(2, clipped to 1) cat sat on mat  -> 5 / 6
    #   2-grams: the cat, cat sat, sat on match; on the, the mat do not -> 3 / 5
    #   3-grams: the cat sat, cat sat on match; sat on the, on the mat do not -> 2 / 4
    #   4-grams: the cat sat on matches; cat sat on the, sat on the mat do not -> 1 / 3
    # Sentence 2 (4 hyp words vs 6 ref words):
    #   1-grams: a dog barked loudly all in ref -> 4 / 4
    #   2-grams: a dog, dog barked match; barked loudly does not -> 2 / 3
    #   3-grams: a dog barked matches; dog barked loudly does not -> 1 / 2
    #   4-grams: a dog barked loudly does not -> 0 / 1
    # Corpus precisions (counts summed first, so no order is zero: no smoothing):
    #   p1 = 9/10, p2 = 5/8, p3 = 3/6 = 1/2, p4 = 1/4
    # Geometric mean = (9/10 * 5/8 * 1/2 * 1/4) ** (1/4) = (9/128) ** 0.25 = 0.514942...
    # Brevity penalty: c = 10 < r = 12 -> exp(1 - 12/10) = exp(-0.2) = 0.818731...
    # BLEU = 100 * 0.818731 * 0.514942 = 42.1599
    expected = 100 * math.exp(1 - 12 / 10) * (9 / 128) ** 0.25
    assert expected == pytest.approx(42.1599, abs=1e-4)
    scores = generation_metrics(predictions, references)
    assert scores["bleu"] == pytest.approx(expected, abs=1e-9)


def test_one_sentence_bleu_without_brevity_penalty():
    # Same sentence 1 as above alone: c = r = 6 -> BP = 1
    # BLEU = 100 * (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25 = 53.7285
    scores = generation_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert scores["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-9)


def test_identical_corpus_scores_100_everywhere():
    texts = ["Quarterly budget review moved to Friday", "Lunch with the design team"]
    scores = generation_metrics(texts, list(texts))
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"):
        assert scores[key] == pytest.approx(100.0), key
    assert scores["empty_predictions"] == 0.0


def test_generation_metrics_keys_means_and_prefix():
    predictions = [PAIR_A[0], PAIR_B[0], PAIR_C[0], "   "]
    references = [PAIR_A[1], PAIR_B[1], PAIR_C[1], "Budget"]
    scores = generation_metrics(predictions, references, prefix="val_")
    assert set(scores) == {
        f"val_{k}"
        for k in (
            "bleu",
            "chrf",
            "rouge1",
            "rouge2",
            "rougeL",
            "exact_match",
            "pred_words",
            "ref_words",
            "empty_predictions",
            "n_examples",
        )
    }
    # mean per-example F1 x 100; the blank prediction scores 0 on every ROUGE
    assert scores["val_rouge1"] == pytest.approx(100 * (4 / 7 + 8 / 9 + 1 + 0) / 4)
    assert scores["val_rouge2"] == pytest.approx(100 * (2 / 5 + 4 / 7 + 0 + 0) / 4)
    assert scores["val_rougeL"] == pytest.approx(100 * (4 / 7 + 8 / 9 + 2 / 3 + 0) / 4)
    assert scores["val_exact_match"] == 0.0
    # words per prediction: 4 + 4 + 3 + 0 = 11 over 4; per reference: 3 + 5 + 3 + 1 = 12 over 4
    assert scores["val_pred_words"] == pytest.approx(11 / 4)
    assert scores["val_ref_words"] == pytest.approx(12 / 4)
    assert scores["val_empty_predictions"] == pytest.approx(25.0)
    assert scores["val_n_examples"] == 4.0
    assert all(isinstance(v, float) for v in scores.values())


def test_chrf_is_between_0_and_100_for_partial_matches():
    scores = generation_metrics(["meeting moved"], ["meeting moved to friday"])
    assert 0.0 < scores["chrf"] < 100.0
    assert generation_metrics(["xyz"], ["abc"])["chrf"] == 0.0


def test_exact_match_normalisation():
    assert exact_match("  Hello   World!! ", "hello world")
    assert exact_match("hello world?", "Hello\tWorld.")
    assert exact_match("Re: budget", "re: budget")
    assert exact_match("", "  ")
    assert not exact_match("hello, world", "hello world")  # inner punctuation counts
    assert not exact_match("hello world", "hello")
    assert generation_metrics(["Hello World!", "x"], ["hello world", "y"])["exact_match"] == 50.0


def test_mismatched_lengths_and_empty_input_are_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        generation_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="nothing to score"):
        generation_metrics([], [])


def test_bleu_signature_names_the_settings():
    signature = bleu_signature()
    version = f"version:{sacrebleu.__version__}"
    for part in ("nrefs:1", "case:mixed", "tok:13a", "smooth:exp", version):
        assert part in signature.split("|"), signature


def test_samples_table_columns_rows_and_scores():
    texts = ["x" * 20, "short email", "third"]
    references = ["Budget review", "Lunch", "Notes"]
    predictions = ["budget review.", "Dinner", "Notes"]
    table = samples_table(texts, references, predictions, n=2, max_chars=10)
    assert list(table.columns) == ["input", "reference", "prediction", "bleu", "exact_match"]
    assert len(table) == 2
    assert table["input"].tolist() == ["x" * 9 + "\u2026", "short ema\u2026"]
    assert all(len(text) <= 10 for text in table["input"])
    assert table["exact_match"].tolist() == [True, False]
    # sentence BLEU (case-sensitive, 13a tokens): "Dinner" vs "Lunch" shares nothing
    assert table["bleu"].iloc[1] == 0.0
    assert table["bleu"].iloc[0] == pytest.approx(
        sacrebleu.sentence_bleu("budget review.", ["Budget review"]).score
    )


def test_samples_table_with_zero_shot_column():
    table = samples_table(["a", "b"], ["r1", "r2"], ["r1", "p2"], baseline_predictions=["z", "r2"])
    assert list(table.columns) == [
        "input",
        "reference",
        "prediction",
        "zero_shot",
        "bleu",
        "exact_match",
    ]
    assert table["zero_shot"].tolist() == ["z", "r2"]
    assert table["input"].tolist() == ["a", "b"]  # short inputs are not cut
    assert table["bleu"].iloc[0] == pytest.approx(100.0)


def test_samples_table_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="equally long"):
        samples_table(["a", "b"], ["r1"], ["p1", "p2"])
    with pytest.raises(ValueError, match="equally long"):
        samples_table(["a"], ["r1"], ["p1"], baseline_predictions=[])
