import json
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from peftflow.config.sections import DataConfig
from peftflow.data import spamassassin
from peftflow.data.ingest import ingest
from peftflow.data.loaders import (
    load_dataset,
    load_generation_table,
    load_sms_collection,
    load_table,
)
from peftflow.data.schema import TABLE_COLUMNS
from peftflow.data.subjects import GENERATION_COLUMNS
from peftflow.errors import ConfigError, DataError
from tests.assets.data.fake_corpus import FAKE_COUNTS, write_fake_corpus

SMS_FILE = Path(__file__).parents[1] / "assets" / "data" / "sms.tsv"


def write_sms_zip(path: Path, member: str = "SMSSpamCollection") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme", "UCI SMS Spam Collection")
        archive.writestr(member, SMS_FILE.read_bytes())
    return path


def test_sms_tab_file_loads_into_standard_table():
    table = load_sms_collection(str(SMS_FILE))

    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table["id"].tolist() == [f"sms-00000{n}" for n in range(1, 6)]
    assert table["label"].tolist() == ["ham", "ham", "spam", "ham", "spam"]
    assert table["text"].iloc[1] == "Ok lar... Joking wif u oni..."
    assert table["text"].iloc[4].endswith("receive a £900 prize reward!")
    assert set(table["subject"]) == {""}
    assert set(table["source"]) == {"sms.tsv"}


def test_sms_zip_gives_the_same_rows_as_the_tab_file(tmp_path):
    from_zip = load_sms_collection(str(write_sms_zip(tmp_path / "sms+spam+collection.zip")))
    from_file = load_sms_collection(str(SMS_FILE))

    assert set(from_zip["source"]) == {"SMSSpamCollection"}
    columns = ["id", "text", "label"]
    pd.testing.assert_frame_equal(from_zip[columns], from_file[columns])


def test_sms_zip_without_the_collection_member(tmp_path):
    archive = write_sms_zip(tmp_path / "other.zip", member="something-else.txt")
    with pytest.raises(DataError, match="no 'SMSSpamCollection' member"):
        load_sms_collection(str(archive))


def test_sms_bad_lines_are_reported_by_number(tmp_path):
    path = tmp_path / "sms.txt"
    path.write_text("ham\tfine\nno tab here\nspam\tok\n\n\tmissing label\nham\t   \n")
    with pytest.raises(DataError, match=r"3 line\(s\) .* \(line 2, 5, 6\)"):
        load_sms_collection(str(path))


def test_sms_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="does not exist; set data.path or data.url"):
        load_sms_collection(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no `label<TAB>text` lines"):
        load_sms_collection(str(tmp_path / "empty.txt"))


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl", ".json"])
def test_table_formats_load_the_same_rows(tmp_path, suffix):
    frame = pd.DataFrame({"body": ["hello there", "buy now", "NA"], "is_spam": [0, 1, 0]})
    path = tmp_path / f"mail{suffix}"
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".parquet": lambda: frame.to_parquet(path, index=False),
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        ".json": lambda: frame.to_json(path, orient="records"),
    }[suffix]()

    table = load_table(path, text_column="body", label_column="is_spam")

    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table["id"].tolist() == ["row-000001", "row-000002", "row-000003"]
    assert table["text"].tolist() == ["hello there", "buy now", "NA"]  # "NA" stays text
    assert table["label"].tolist() == ["0", "1", "0"]  # labels cast to str
    assert set(table["source"]) == {path.name}


def test_table_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'.*\.csv, \.parquet"):
        load_table(tmp_path / "mail.xlsx", "text", "label")
    with pytest.raises(DataError, match="does not exist; set data.path"):
        load_table(tmp_path / "missing.csv", "text", "label")

    path = tmp_path / "mail.csv"
    path.write_text("message,category\nhi,ham\n")
    with pytest.raises(DataError) as caught:
        load_table(path, "text", "label")
    message = str(caught.value)
    assert "no column(s) ['text', 'label']" in message
    assert "available columns: ['message', 'category']" in message
    assert "data.text_column / data.label_column" in message


def test_table_with_null_labels_is_refused(tmp_path):
    path = tmp_path / "mail.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["ham", None, "spam"]}).to_parquet(path)
    with pytest.raises(DataError, match=r"1 row\(s\) have an empty text or label \(data row 2\)"):
        load_table(path, "text", "label")


def test_unreadable_table_is_a_data_error(tmp_path):
    path = tmp_path / "mail.parquet"
    path.write_text("not parquet at all")
    with pytest.raises(DataError, match="could not read .*mail.parquet"):
        load_table(path, "text", "label")


def test_load_dataset_dispatches_on_source(tmp_path, monkeypatch):
    sms = load_dataset(DataConfig(source="sms", path=str(SMS_FILE)), tmp_path)
    assert len(sms) == 5

    csv = tmp_path / "own.csv"
    csv.write_text("msg,y\nhello,ham\nwin,spam\n")
    table = load_dataset(
        DataConfig(source="table", path=str(csv), text_column="msg", label_column="y"), tmp_path
    )
    assert table["label"].tolist() == ["ham", "spam"]

    # An already-extracted corpus in the cache is used as is (no npm call).
    write_fake_corpus(tmp_path / "cache" / "0.2.3" / "package" / "data")
    for group, count in FAKE_COUNTS.items():
        monkeypatch.setitem(spamassassin.EXPECTED_GROUP_COUNTS, group, count)
    corpus = load_dataset(DataConfig(), tmp_path / "cache")
    assert corpus["label"].value_counts().to_dict() == {"ham": 4, "spam": 2}


# --- task "generation": prompt/response tables ------------------------------------


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    writers = {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".parquet": lambda: frame.to_parquet(path, index=False),
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
    }
    writers[path.suffix]()
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_generation_table_formats_load_the_same_rows(tmp_path, suffix):
    frame = pd.DataFrame(
        {
            "document": ["a long report", "NA", "minutes"],
            "summary": ["short", "null", "None"],
            "other": [1, 2, 3],
        }
    )
    path = write_table(frame, tmp_path / f"docs{suffix}")

    table = load_generation_table(path, prompt_column="document", response_column="summary")

    assert list(table.columns) == list(GENERATION_COLUMNS)
    assert table["id"].tolist() == ["row-000001", "row-000002", "row-000003"]
    assert table["prompt"].tolist() == ["a long report", "NA", "minutes"]  # "NA" stays text
    assert table["response"].tolist() == ["short", "null", "None"]
    assert set(table["source"]) == {path.name}


def test_generation_table_missing_columns_name_the_fields_to_set(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("instruction,output\ndo it,done\n")
    with pytest.raises(DataError) as caught:
        load_generation_table(path, "prompt", "output")
    message = str(caught.value)
    assert "no column(s) ['prompt']" in message
    assert "available columns: ['instruction', 'output']" in message
    assert "data.prompt_column / data.response_column" in message


def test_generation_table_null_values_are_refused_by_row(tmp_path):
    path = tmp_path / "docs.parquet"
    frame = pd.DataFrame({"prompt": ["a", None, "c", "d"], "response": ["x", "y", "z", None]})
    frame.to_parquet(path)
    with pytest.raises(
        DataError, match=r"2 row\(s\) have an empty prompt or response \(data row 2, 4\)"
    ):
        load_generation_table(path, "prompt", "response")


def test_generation_table_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist; set data.path"):
        load_generation_table(tmp_path / "missing.jsonl", "prompt", "response")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_generation_table(tmp_path / "docs.txt", "prompt", "response")


def test_load_dataset_as_prompt_response_pairs(tmp_path, monkeypatch):
    csv = tmp_path / "own.csv"
    csv.write_text("question,answer\nwhat?,that\n")
    cfg = DataConfig(
        source="table", path=str(csv), prompt_column="question", response_column="answer"
    )

    table = load_dataset(cfg, tmp_path, layout="pairs")
    assert table[["prompt", "response"]].values.tolist() == [["what?", "that"]]

    # SpamAssassin keeps the classification schema: subjects are derived from it later.
    write_fake_corpus(tmp_path / "cache" / "0.2.3" / "package" / "data")
    for group, count in FAKE_COUNTS.items():
        monkeypatch.setitem(spamassassin.EXPECTED_GROUP_COUNTS, group, count)
    corpus = load_dataset(DataConfig(), tmp_path / "cache", layout="pairs")
    assert list(corpus.columns) == list(TABLE_COLUMNS)

    with pytest.raises(ConfigError, match="unknown table layout 'regression'; valid layouts"):
        load_dataset(cfg, tmp_path, layout="regression")


def test_ingest_of_a_generation_table_has_no_label_counts(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    path = write_table(
        pd.DataFrame({"prompt": ["doc one", "doc two"], "response": ["one", "two"]}),
        tmp_path / "docs.jsonl",
    )

    result = ingest(DataConfig(source="table", path=str(path)), root, push=False, layout="pairs")

    assert result.label_counts == {}
    assert result.n_rows == 2
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["label_counts"] == {}
    assert manifest["columns"] == list(GENERATION_COLUMNS)
    pd.testing.assert_frame_equal(
        pd.read_parquet(result.table_path), load_generation_table(path, "prompt", "response")
    )
