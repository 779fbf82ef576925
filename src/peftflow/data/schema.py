"""The one table layout every loader returns, so later stages never care about the source.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

# id: unique and stable across re-ingests; text: the model input; label: a class
# name; subject: the email Subject ("" for SMS / tables); source: group or file name.
TABLE_COLUMNS: tuple[str, ...] = ("id", "text", "label", "subject", "source")


def make_table(records: Iterable[Mapping[str, str]]) -> pd.DataFrame:
    """Records -> DataFrame with :data:`TABLE_COLUMNS` as str columns, sorted by id.

    Sorting (and a fresh 0..n-1 index) makes the written file depend only on the
    content, never on directory listing order, so re-ingesting gives the same md5.
    """
    table = pd.DataFrame.from_records(list(records), columns=list(TABLE_COLUMNS))
    table = table.astype({column: "str" for column in TABLE_COLUMNS})
    return table.sort_values("id", kind="stable").reset_index(drop=True)
