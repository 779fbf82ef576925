"""Generation splits: repeated prompts dropped, responses grouped, deterministic, capped."""

from __future__ import annotations

import pandas as pd
import pytest

from peftflow.config.sections import SplitConfig
from peftflow.data.split import (
    DUPLICATES_ATTR,
    SPLITS,
    generation_split_summary,
    normalise_text,
    split_generation,
)
from peftflow.errors import ConfigError, DataError


def make_table(n: int = 100, n_subjects: int = 40) -> pd.DataFrame:
    """Distinct prompts; responses repeat like threads (row k has subject k % n_subjects)."""
    return pd.DataFrame(
        {
            "id": [f"g{k:04d}" for k in range(n)],
            "prompt": [f"email body number {k}" for k in range(n)],
            "response": [f"Subject {k % n_subjects}" for k in range(n)],
            "source": "test",
        }
    )


def responses(frame: pd.DataFrame) -> set[str]:
    return set(frame["response"].map(normalise_text))


def test_rows_sharing_a_response_stay_in_one_split():
    table = make_table()
    # Same subject up to case and spacing: still one group.
    table.loc[99, "response"] = "  subject   19 "

    splits = split_generation(table, SplitConfig(), seed=0)

    assert all(len(splits[name]) > 0 for name in SPLITS)
    assert responses(splits["train"]).isdisjoint(responses(splits["val"]))
    assert responses(splits["train"]).isdisjoint(responses(splits["test"]))
    assert responses(splits["val"]).isdisjoint(responses(splits["test"]))
    assert sum(len(frame) for frame in splits.values()) == len(table)


def test_held_out_sizes_follow_the_fractions_by_rows():
    splits = split_generation(make_table(200, 150), SplitConfig(), seed=3)

    assert len(splits["test"]) == 40
    assert len(splits["val"]) == 40
    assert len(splits["train"]) == 120


def test_repeated_prompts_are_dropped_keeping_the_first_by_id():
    table = make_table()
    table.loc[5, "prompt"] = "EMAIL body   number 2"  # repeats g0002 up to case and spacing

    splits = split_generation(table, SplitConfig(), seed=0)

    ids = set(pd.concat(splits.values())["id"])
    assert "g0005" not in ids
    assert "g0002" in ids
    assert {frame.attrs[DUPLICATES_ATTR] for frame in splits.values()} == {1}


def test_frames_are_sorted_labelled_and_independent_of_row_order():
    table = make_table()
    first = split_generation(table, SplitConfig(), seed=7)
    shuffled = split_generation(table.sample(frac=1.0, random_state=1), SplitConfig(), seed=7)
    other_seed = split_generation(table, SplitConfig(), seed=8)

    for name in SPLITS:
        pd.testing.assert_frame_equal(first[name], shuffled[name])
        assert first[name]["id"].is_monotonic_increasing
        assert set(first[name]["split"]) == {name}
        assert first[name].index.tolist() == list(range(len(first[name])))
    assert first["test"]["id"].tolist() != other_seed["test"]["id"].tolist()


def test_max_train_examples_caps_train_only():
    cfg = SplitConfig(max_train_examples=10)
    full = split_generation(make_table(), SplitConfig(), seed=0)
    capped = split_generation(make_table(), cfg, seed=0)

    assert len(capped["train"]) == 10
    assert set(capped["train"]["id"]) <= set(full["train"]["id"])
    pd.testing.assert_frame_equal(capped["test"], full["test"])
    pd.testing.assert_frame_equal(capped["val"], full["val"])


def test_balance_train_is_refused_for_generation():
    with pytest.raises(ConfigError, match="balance_train .* task .classification. only"):
        split_generation(make_table(), SplitConfig(balance_train=True), seed=0)


def test_too_few_response_groups_is_a_data_error_with_counts():
    with pytest.raises(DataError) as caught:
        split_generation(make_table(n=40, n_subjects=2), SplitConfig(), seed=0)
    message = str(caught.value)
    assert "40 row(s) with distinct prompts and 2 distinct response(s)" in message
    assert "Add examples" in message


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(DataError, match=r"lacks column\(s\) \['response'\].*generation_examples"):
        split_generation(make_table().drop(columns="response"), SplitConfig(), seed=0)
    repeated_ids = make_table().assign(id="same")
    with pytest.raises(DataError, match="occur more than once"):
        split_generation(repeated_ids, SplitConfig(), seed=0)
    missing = make_table().astype({"response": object})
    missing.loc[3, "response"] = None
    with pytest.raises(DataError, match="`response` values are missing.*validate_generation_raw"):
        split_generation(missing, SplitConfig(), seed=0)


def test_summary_counts_rows_and_distinct_responses():
    table = make_table(n=100, n_subjects=40)
    table.loc[1, "prompt"] = table.loc[0, "prompt"]
    splits = split_generation(table, SplitConfig(), seed=0)

    summary = generation_split_summary(splits)

    assert summary["duplicates_dropped"] == 1
    assert set(summary["splits"]) == set(SPLITS)
    for name in SPLITS:
        assert summary["splits"][name] == {
            "rows": len(splits[name]),
            "distinct_responses": len(responses(splits[name])),
        }
    assert sum(s["distinct_responses"] for s in summary["splits"].values()) == 40
