"""Deterministic, stratified, leakage-free splitting."""

from __future__ import annotations

import pandas as pd
import pytest

from peftflow.config.sections import SplitConfig
from peftflow.data.split import deduplicate, normalise_text, split_dataset, split_summary
from peftflow.errors import DataError


def make_table(n_ham: int = 70, n_spam: int = 30) -> pd.DataFrame:
    """Distinct texts, ids zero-padded so id order is numeric order."""
    rows = [("ham", i) for i in range(n_ham)] + [("spam", i) for i in range(n_spam)]
    return pd.DataFrame(
        {
            "id": [f"r{k:04d}" for k in range(len(rows))],
            "text": [f"{label} message number {i}" for label, i in rows],
            "label": [label for label, _ in rows],
            "subject": "subject",
            "source": "test",
        }
    )


def test_normalise_text_casefolds_and_collapses_whitespace():
    assert normalise_text("  Hello\n\tWORLD  again ") == "hello world again"
    assert normalise_text("Straße") == normalise_text("STRASSE")


def test_deduplicate_keeps_first_by_id_and_counts_dropped():
    df = pd.DataFrame(
        {
            "id": ["b", "a", "c"],
            "text": ["Hello  World", "hello world", "other"],
            "label": ["ham", "ham", "spam"],
        }
    )
    kept, dropped = deduplicate(df)
    assert dropped == 1
    assert kept["id"].tolist() == ["a", "c"]


def test_deduplicate_drops_every_row_of_a_text_with_conflicting_labels():
    df = pd.DataFrame(
        {
            "id": ["1", "2", "3", "4"],
            "text": ["win money", "WIN money", "win  money", "hi"],
            "label": ["spam", "ham", "spam", "ham"],
        }
    )
    kept, dropped = deduplicate(df)
    assert kept["id"].tolist() == ["4"]
    assert dropped == 3


def test_split_is_stratified_with_the_configured_sizes():
    splits = split_dataset(make_table(), SplitConfig(val_fraction=0.2, test_fraction=0.2), seed=7)
    sizes = {name: len(frame) for name, frame in splits.items()}
    assert sizes == {"train": 60, "val": 20, "test": 20}
    for name, frame in splits.items():
        assert (frame["split"] == name).all()
        # 70/30 class ratio is kept in every split.
        assert frame["label"].value_counts(normalize=True)["spam"] == pytest.approx(0.3)


def test_split_is_identical_when_input_rows_are_shuffled():
    table = make_table()
    cfg = SplitConfig()
    first = split_dataset(table, cfg, seed=3)
    shuffled = split_dataset(table.sample(frac=1.0, random_state=99), cfg, seed=3)
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(first[name], shuffled[name])


def test_a_different_seed_gives_a_different_split():
    table = make_table()
    a = split_dataset(table, SplitConfig(), seed=1)["test"]["id"].tolist()
    b = split_dataset(table, SplitConfig(), seed=2)["test"]["id"].tolist()
    assert a != b


def test_duplicates_never_leak_across_splits():
    table = make_table()
    # Every ham text appears a second time with different case/spacing.
    copies = table[table["label"] == "ham"].assign(
        id=lambda d: d["id"] + "-copy", text=lambda d: "  " + d["text"].str.upper()
    )
    splits = split_dataset(pd.concat([table, copies]), SplitConfig(), seed=0)
    keys = {name: set(frame["text"].map(normalise_text)) for name, frame in splits.items()}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["val"]
    assert not keys["val"] & keys["test"]
    assert split_summary(splits)["duplicates_dropped"] == 70


def test_balance_train_downsamples_majority_in_train_only():
    splits = split_dataset(make_table(), SplitConfig(balance_train=True), seed=0)
    train_counts = splits["train"]["label"].value_counts()
    assert train_counts["ham"] == train_counts["spam"] == 18
    # Held-out splits keep the natural 70/30 distribution.
    assert splits["test"]["label"].value_counts().to_dict() == {"ham": 14, "spam": 6}


def test_max_train_examples_caps_train_keeping_class_ratio():
    splits = split_dataset(make_table(), SplitConfig(max_train_examples=10), seed=0)
    assert splits["train"]["label"].value_counts().to_dict() == {"ham": 7, "spam": 3}
    assert len(splits["val"]) == 20


def test_max_train_examples_below_class_count_is_a_clear_error():
    with pytest.raises(
        DataError, match="max_train_examples=1 is smaller than the number of classes"
    ):
        split_dataset(make_table(), SplitConfig(max_train_examples=1), seed=0)


def test_too_few_rows_in_a_class_names_the_class_and_counts():
    with pytest.raises(DataError) as err:
        split_dataset(make_table(n_ham=50, n_spam=3), SplitConfig(), seed=0)
    message = str(err.value)
    assert "'spam': 3" in message and "'ham': 50" in message
    assert "short: ['spam']" in message
    assert ">= 6 rows" in message


def test_single_class_cannot_be_split():
    with pytest.raises(DataError, match="there must be >= 2 classes"):
        split_dataset(make_table(n_ham=50, n_spam=0), SplitConfig(), seed=0)


def test_repeated_ids_are_rejected_before_splitting():
    table = make_table()
    table.loc[5, "id"] = table.loc[4, "id"]
    with pytest.raises(DataError, match="1 id\\(s\\) occur more than once.*r0004"):
        split_dataset(table, SplitConfig(), seed=0)


def test_missing_columns_are_named():
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label'\]"):
        split_dataset(make_table().drop(columns="label"), SplitConfig(), seed=0)


def test_split_summary_reports_rows_and_labels():
    summary = split_summary(split_dataset(make_table(), SplitConfig(), seed=0))
    assert summary["duplicates_dropped"] == 0
    assert summary["splits"]["val"] == {"rows": 20, "labels": {"ham": 14, "spam": 6}}
    assert summary["splits"]["train"]["rows"] == 60
