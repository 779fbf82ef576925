"""Deterministic, leakage-free train/val/test splits.

Duplicates are removed *before* splitting: a message that appears twice would
otherwise land in train and test and inflate the test score. Rows are sorted
by ``id`` first, so the same table and seed give identical splits whatever
order the rows arrive in (a re-ingested corpus, a shuffled parquet file).

Depends on: config.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from peftflow.config import SplitConfig
from peftflow.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("id", "text", "label")
GENERATION_REQUIRED_COLUMNS = ("id", "prompt", "response")
# Kept in DataFrame.attrs so split_summary can report it without a side channel.
DUPLICATES_ATTR = "duplicates_dropped"


def normalise_text(text: str) -> str:
    """Casefold and collapse whitespace: the key that decides what counts as a duplicate."""
    return " ".join(text.casefold().split())


def deduplicate(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row (by id) of each normalised text; returns ``(kept, n_dropped)``.

    A text that carries two different labels is ambiguous, so all of its rows go.
    """
    ordered = df.sort_values("id", kind="stable").reset_index(drop=True)
    key = ordered["text"].map(normalise_text)
    labels_per_text = ordered.groupby(key)["label"].transform("nunique")
    drop = key.duplicated(keep="first") | (labels_per_text > 1)
    kept = ordered[~drop].reset_index(drop=True)
    return kept, len(ordered) - len(kept)


def split_dataset(df: pd.DataFrame, cfg: SplitConfig, seed: int) -> dict[str, pd.DataFrame]:
    """Dedupe, then a seeded stratified split into ``train``/``val``/``test``.

    ``balance_train`` and ``max_train_examples`` shape train only: val and test
    keep the natural class distribution so their metrics stay honest. Each
    frame gets a ``split`` column and is sorted by id.
    """
    _require_splittable_input(df)
    kept, n_dropped = deduplicate(df)
    _require_enough_rows_per_class(kept, cfg)
    train_val, test = _stratified_split(kept, cfg.test_fraction, seed)
    # val_fraction is of the whole table, so rescale it to the train+val part.
    train, val = _stratified_split(train_val, cfg.val_fraction / (1 - cfg.test_fraction), seed)
    if cfg.balance_train:
        train = _downsample_to_minority(train, seed)
    if cfg.max_train_examples is not None and len(train) > cfg.max_train_examples:
        train = _stratified_cap(train, cfg.max_train_examples, seed)
    splits = {"train": train, "val": val, "test": test}
    return {name: _finish(splits[name], name, n_dropped) for name in SPLITS}


def split_summary(splits: dict[str, pd.DataFrame]) -> dict:
    """Rows and label counts per split, plus how many duplicates were dropped (None if unknown)."""
    dropped = next((f.attrs.get(DUPLICATES_ATTR) for f in splits.values()), None)
    return {
        "duplicates_dropped": dropped,
        "splits": {
            name: {
                "rows": len(frame),
                "labels": {
                    str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()
                },
            }
            for name, frame in splits.items()
        },
    }


def _require_splittable_input(df: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"cannot split: the table lacks column(s) {missing} (has {list(df.columns)}); "
            "ingest it into the standard schema id/text/label/subject/source first"
        )
    repeated = df.loc[df["id"].duplicated(), "id"].unique().tolist()
    if repeated:
        raise DataError(
            f"cannot split deterministically: {len(repeated)} id(s) occur more than once "
            f"(e.g. {repeated[:5]}); give every row a unique id"
        )
    if df["text"].map(lambda t: not isinstance(t, str)).any():
        raise DataError(
            "cannot split: some `text` values are missing or not strings; "
            "run the raw-data checks (peftflow.checks.validate_raw) and fix the rows they list"
        )


def _require_enough_rows_per_class(df: pd.DataFrame, cfg: SplitConfig) -> None:
    """Every class needs at least one row in each of the three splits."""
    # floor(count * fraction) >= 1 for the smaller held-out split, plus one row for train.
    needed = math.ceil(1 / min(cfg.val_fraction, cfg.test_fraction)) + 1
    counts = df["label"].value_counts().sort_index()
    too_small = counts[counts < needed]
    if len(counts) < 2 or not too_small.empty:
        raise DataError(
            f"too few rows to stratify: class counts after removing duplicates are "
            f"{ {str(k): int(v) for k, v in counts.items()} }; with val_fraction="
            f"{cfg.val_fraction} and test_fraction={cfg.test_fraction} every class needs "
            f">= {needed} rows and there must be >= 2 classes "
            f"(short: {list(map(str, too_small.index))}). Add examples of those classes "
            "or raise val_fraction/test_fraction."
        )


def _stratified_split(
    df: pd.DataFrame, held_out_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    # Imported here: sklearn costs ~2.5 s and peftflow.checks imports this module.
    from sklearn.model_selection import train_test_split

    kept, held_out = train_test_split(
        df, test_size=held_out_fraction, stratify=df["label"], random_state=seed
    )
    return kept, held_out


def _downsample_to_minority(train: pd.DataFrame, seed: int) -> pd.DataFrame:
    minority = int(train["label"].value_counts().min())
    return train.groupby("label", group_keys=False).sample(n=minority, random_state=seed)


def sample_train(train: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most ``cap`` rows of ``train``: stratified by label when it has labels, else seeded."""
    if len(train) <= cap:
        return train
    if "label" not in train.columns:
        return train.sample(n=cap, random_state=seed).sort_index()
    return _stratified_cap(train, cap, seed)


def _stratified_cap(train: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    quotas = _proportional_quotas(train["label"].value_counts().sort_index(), cap)
    picked = [
        train[train["label"] == label].sample(n=quota, random_state=seed)
        for label, quota in quotas.items()
    ]
    return pd.concat(picked)


def _proportional_quotas(counts: pd.Series, total: int) -> dict[str, int]:
    """Split ``total`` rows across classes in proportion to ``counts`` (largest remainder).

    Every class first gets one row, so no label disappears from train; the rest
    is shared in proportion to what each class has beyond that row.
    """
    if total < len(counts):
        raise DataError(
            f"max_train_examples={total} is smaller than the number of classes ({len(counts)}); "
            f"set it to at least {len(counts)} or remove it"
        )
    spare = counts - 1
    exact = spare * (total - len(counts)) / spare.sum()
    quotas = 1 + exact.astype(int)
    # Hand out what flooring left over, largest fractional part first (ties: label order).
    leftover = total - int(quotas.sum())
    by_remainder = (exact - exact.astype(int)).sort_values(ascending=False, kind="stable")
    for label in by_remainder.index[:leftover]:
        quotas[label] += 1
    return {str(label): int(q) for label, q in quotas.items()}


# --- generation ---------------------------------------------------------------


def split_generation(df: pd.DataFrame, cfg: SplitConfig, seed: int) -> dict[str, pd.DataFrame]:
    """Drop repeated prompts, then a seeded split that keeps each response in one split.

    Rows sharing a normalised response (a mailing-list thread shares its subject)
    go to the same split as a group; otherwise a test subject would be memorised
    from train. val/test sizes follow the fractions approximately, by rows.
    """
    if cfg.balance_train:
        raise ConfigError(
            "data.split.balance_train balances classes and applies to task 'classification' "
            "only; remove it (or set it to false) for task 'generation'"
        )
    _require_generation_input(df)
    kept, n_dropped = _drop_repeated_prompts(df)
    assignment = _assign_response_groups(kept, cfg, seed)
    splits = {name: kept[assignment == name] for name in SPLITS}
    _require_three_splits(splits, kept, cfg)
    cap = cfg.max_train_examples
    if cap is not None and len(splits["train"]) > cap:
        splits["train"] = splits["train"].sample(n=cap, random_state=seed)
    return {name: _finish(splits[name], name, n_dropped) for name in SPLITS}


def generation_split_summary(splits: dict[str, pd.DataFrame]) -> dict:
    """Rows and distinct (normalised) responses per split, plus duplicate prompts dropped."""
    dropped = next((f.attrs.get(DUPLICATES_ATTR) for f in splits.values()), None)
    return {
        "duplicates_dropped": dropped,
        "splits": {
            name: {
                "rows": len(frame),
                "distinct_responses": int(frame["response"].map(normalise_text).nunique()),
            }
            for name, frame in splits.items()
        },
    }


def _require_generation_input(df: pd.DataFrame) -> None:
    missing = [c for c in GENERATION_REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"cannot split generation data: the table lacks column(s) {missing} "
            f"(has {list(df.columns)}); build it with peftflow.data.subjects.generation_examples"
        )
    repeated = df.loc[df["id"].duplicated(), "id"].unique().tolist()
    if repeated:
        raise DataError(
            f"cannot split deterministically: {len(repeated)} id(s) occur more than once "
            f"(e.g. {repeated[:5]}); give every row a unique id"
        )
    for column in ("prompt", "response"):
        if df[column].map(lambda value: not isinstance(value, str)).any():
            raise DataError(
                f"cannot split: some `{column}` values are missing or not strings; run the "
                "generation raw-data checks (peftflow.checks.validate_generation_raw) and fix "
                "the rows they list"
            )


def _drop_repeated_prompts(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row (by id) of each normalised prompt; returns ``(kept, n_dropped)``."""
    ordered = df.sort_values("id", kind="stable").reset_index(drop=True)
    repeated = ordered["prompt"].map(normalise_text).duplicated(keep="first")
    kept = ordered[~repeated].reset_index(drop=True)
    return kept, len(ordered) - len(kept)


def _assign_response_groups(df: pd.DataFrame, cfg: SplitConfig, seed: int) -> pd.Series:
    """The split name of every row; all rows of one normalised response share it.

    Groups are visited in a seeded random order; a group joins test (then val)
    while it fits that split's row target, else train. Large groups therefore end
    up in train rather than overshooting a held-out split.
    """
    keys = df["response"].map(normalise_text)
    sizes = keys.value_counts().sort_index()  # sorted first: independent of row order
    order = np.random.default_rng(seed).permutation(len(sizes))
    targets = {
        "test": max(1, round(cfg.test_fraction * len(df))),
        "val": max(1, round(cfg.val_fraction * len(df))),
    }
    filled = dict.fromkeys(targets, 0)
    split_of: dict[str, str] = {}
    for position in order:
        key, size = sizes.index[position], int(sizes.iloc[position])
        name = next((n for n in targets if filled[n] + size <= targets[n]), "train")
        filled[name] = filled.get(name, 0) + size
        split_of[key] = name
    return keys.map(split_of)


def _require_three_splits(
    splits: dict[str, pd.DataFrame], kept: pd.DataFrame, cfg: SplitConfig
) -> None:
    empty = [name for name, frame in splits.items() if frame.empty]
    if empty:
        n_groups = kept["response"].map(normalise_text).nunique()
        raise DataError(
            f"too few examples to split generation data: {len(kept)} row(s) with distinct "
            f"prompts and {n_groups} distinct response(s) left split(s) {empty} empty "
            f"(val_fraction={cfg.val_fraction}, test_fraction={cfg.test_fraction}; rows "
            "sharing a response stay together). Add examples with other responses or "
            "raise val_fraction/test_fraction."
        )


def _finish(frame: pd.DataFrame, name: str, n_dropped: int) -> pd.DataFrame:
    out = frame.sort_values("id").reset_index(drop=True).assign(split=name)
    out.attrs[DUPLICATES_ATTR] = n_dropped
    return out
