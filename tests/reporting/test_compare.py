"""peftflow compare (ranking, Pareto fronts, report, comparison run) and peftflow ui."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from peftflow.cli.main import app
from peftflow.cli.ui import is_loopback, ui_argv
from peftflow.errors import PeftflowError
from peftflow.reporting import compare, comparison
from peftflow.reporting.compare import (
    CSV_FILE,
    PLOT_FILES,
    REPORT_FILE,
    fixed_width_table,
    run_compare,
)
from peftflow.reporting.comparison import (
    CompareError,
    RunRow,
    collect,
    newest_per_run_key,
    pareto_front,
    pareto_fronts,
)
from peftflow.tracking.runs import RunTracker, ensure_experiment
from tests.servers import free_port, wait_healthy

EXPERIMENT = "variants"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RANKED = ["full", "lora", "no-memory", "bitfit", "head"]
runner = CliRunner()


def log_run(
    uri: str,
    root: Path,
    name: str,
    metrics: dict[str, float],
    kind: str = "finetune",
    status: str = "FINISHED",
    **tags: str,
) -> str:
    """A run tagged as the pipeline tags it (no training); ``tags`` keys omit ``peftflow.``."""
    experiment_id = ensure_experiment(EXPERIMENT, uri, root)
    defaults = {"method": name, "task": "classification", "base_model": "minilm"}
    all_tags = {f"peftflow.{key}": value for key, value in {**defaults, **tags}.items()}
    all_tags["peftflow.kind"] = kind
    tracker = RunTracker(uri)
    run_id = tracker.start(experiment_id, name, all_tags, {})
    tracker.log_metrics(metrics)
    tracker.finish(status)
    time.sleep(0.002)  # distinct start times, so "newest" is well defined
    return run_id


def costs(f1: float, share: float, seconds: float, memory: float | None) -> dict[str, float]:
    metrics = {"test_f1": f1, "trainable_percent": share, "train_seconds": seconds}
    return metrics if memory is None else {**metrics, "peak_memory_mb": memory}


@pytest.fixture
def variants(tracking_uri: str, tmp_path: Path) -> dict[str, str]:
    """Five ranked variants, one without the metric, a retrain, a baseline and runs to ignore.

    Fronts worked out by hand (cost -> test F1):
      trainable %: head 0.01->0.80, bitfit 0.5->0.90, lora 1.2->0.94, full 100->0.95
                   (no-memory 2.0->0.93 loses to lora: dearer and worse)
      train time:  head 20->0.80, no-memory 30->0.93, lora 40->0.94, full 60->0.95
                   (bitfit 50->0.90 loses to lora)
      peak memory: head 1000, lora 1200, full 1500 (bitfit 1600 loses; no-memory has none)
    """
    runs = [
        ("lora-old", "lora", costs(0.70, 1.2, 45, 1250), {"run_key": "k-lora"}),
        ("full", "full", costs(0.95, 100.0, 60, 1500), {"run_key": "k-full"}),
        ("lora", "lora", costs(0.94, 1.2, 40, 1200), {"run_key": "k-lora"}),
        ("head", "head", costs(0.80, 0.01, 20, 1000), {"method": "last_layer"}),
        ("bitfit", "bitfit", costs(0.90, 0.5, 50, 1600), {}),
        ("no-memory", "no-memory", costs(0.93, 2.0, 30, None), {"method": "ia3"}),
        ("no-f1", "no-f1", {"test_accuracy": 0.9, "train_seconds": 10.0}, {"method": "vera"}),
        (
            "tfidf",
            "baseline-tfidf-logreg",
            {"test_f1": 0.97, "train_seconds": 11.0},
            {"kind": "baseline", "method": "tfidf_logreg"},
        ),
        ("study", "study-parent", {"test_f1": 0.99}, {"kind": "study"}),
        ("crashed", "crashed", costs(0.999, 0.1, 1, 100), {"status": "FAILED"}),
    ]
    return {
        key: log_run(tracking_uri, tmp_path, name, metrics, **extra)
        for key, name, metrics, extra in runs
    }


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- Pareto fronts on hand-made points ---------------------------------------------------------


def brute_force_front(points):
    """The definition, literally: no other point as cheap and as good, one of them strictly."""

    def dominates(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    known = [p for p in points if None not in p]
    return [None not in p and not any(dominates(q, p) for q in known) for p in points]


def test_front_of_one_point_of_nothing_and_of_missing_values():
    assert pareto_front([(1.0, 0.5)]) == [True]
    assert pareto_front([]) == []
    assert pareto_front([(None, 0.9), (1.0, None)]) == [False, False]


def test_front_keeps_ties_and_drops_dominated_points():
    points = [
        (1.0, 0.9),  # identical twins: neither dominates the other
        (1.0, 0.9),
        (1.0, 0.8),  # as cheap, worse
        (2.0, 0.9),  # as good, dearer
        (3.0, 0.95),  # dearer but better: on the front
        (None, 0.99),  # best metric, but its cost is unknown
        (0.5, 0.1),  # cheapest
    ]
    assert pareto_front(points) == [True, True, False, False, True, False, True]


def test_front_matches_the_definition_on_random_points():
    rng = random.Random(0)
    for _ in range(300):
        points = [
            (rng.choice([None, 1, 2, 3, 4]), rng.choice([None, 0.1, 0.5, 0.9]))
            for _ in range(rng.randint(0, 9))
        ]
        assert pareto_front(points) == brute_force_front(points), points


def row(run_id: str, metric: float | None, **fields) -> RunRow:
    defaults = dict.fromkeys(("trainable_percent", "train_seconds", "peak_memory_mb"))
    defaults.update(run_name=run_id, method="m", base_model="b", task="classification")
    return RunRow(run_id=run_id, metric=metric, **{**defaults, "start_time": 0, **fields})


def test_fronts_per_cost_leave_out_rows_missing_that_cost():
    rows = [
        row("a", 0.9, trainable_percent=1.0, train_seconds=10.0),
        row("b", 0.8, trainable_percent=0.1, train_seconds=20.0, peak_memory_mb=5.0),
        row("c", 0.95, trainable_percent=50.0),
    ]
    fronts = pareto_fronts(rows)
    assert fronts["trainable_percent"] == {"a", "b", "c"}
    assert fronts["train_seconds"] == {"a"}  # b is dearer and worse; c has no time
    assert fronts["peak_memory_mb"] == {"b"}


def test_newest_run_of_a_run_key_is_kept():
    rows = [
        row("old", 0.99, run_key="k", start_time=1),
        row("new", 0.5, run_key="k", start_time=3),
        row("middle", 0.7, run_key="k", start_time=2),
        row("solo", 0.6, run_key=None, start_time=0),
    ]
    kept, dropped = newest_per_run_key(rows)
    assert [r.run_id for r in kept] == ["new", "solo"]
    assert [r.run_id for r in dropped] == ["old", "middle"]


def test_fixed_width_table_aligns_text_left_and_numbers_right():
    table = fixed_width_table(["run", "f1"], [["a", "0.5000"], ["long-name", "12.0000"]])
    assert table.splitlines() == [
        "run             f1",
        "a           0.5000",
        "long-name  12.0000",
    ]


# --- collecting an experiment ------------------------------------------------------------------


def test_collect_ranks_finished_finetune_runs_and_marks_fronts(tracking_uri, variants):
    result = collect(EXPERIMENT, tracking_uri)
    assert result.metric == "test_f1" and result.task == "classification"
    assert [r.run_name for r in result.ranked] == RANKED
    lora = result.ranked[1]
    assert (lora.run_id, lora.method, lora.base_model) == (variants["lora"], "lora", "minilm")
    assert (lora.trainable_percent, lora.train_seconds, lora.peak_memory_mb) == (1.2, 40, 1200)
    assert result.ranked[2].peak_memory_mb is None
    assert [r.run_name for r in result.skipped] == ["no-f1"]
    assert [r.run_id for r in result.dropped] == [variants["lora-old"]]
    assert [(b.run_name, b.metric) for b in result.baselines] == [("baseline-tfidf-logreg", 0.97)]

    def on_front(cost):
        return {r.run_name for r in result.ranked if r.run_id in result.fronts[cost]}

    assert on_front("trainable_percent") == {"head", "bitfit", "lora", "full"}
    assert on_front("train_seconds") == {"head", "no-memory", "lora", "full"}
    assert on_front("peak_memory_mb") == {"head", "lora", "full"}


def test_collect_pages_through_large_experiments(tracking_uri, variants, monkeypatch):
    monkeypatch.setattr(comparison, "PAGE_SIZE", 2)
    result = collect(EXPERIMENT, tracking_uri)
    assert [r.run_name for r in result.ranked] == RANKED
    assert len(result.skipped) == len(result.dropped) == len(result.baselines) == 1


def test_several_tasks_need_a_task_or_a_metric(tracking_uri, tmp_path, variants):
    bleu = {"test_bleu": 21.5, "trainable_percent": 0.5, "train_seconds": 80.0}
    log_run(tracking_uri, tmp_path, "subject-lora", bleu, task="generation", method="lora")
    log_run(
        tracking_uri,
        tmp_path,
        "zero-shot",
        {"test_bleu": 3.0},
        kind="baseline",
        task="generation",
        method="zero_shot",
    )
    with pytest.raises(CompareError, match=r"several tasks \(classification, generation\)") as err:
        collect(EXPERIMENT, tracking_uri)
    message = str(err.value)
    assert "--task classification (metric test_f1)" in message
    assert "--task generation (metric test_bleu)" in message and "--metric" in message

    generation = collect(EXPERIMENT, tracking_uri, task="generation")
    assert (generation.metric, generation.task) == ("test_bleu", "generation")
    assert [r.run_name for r in generation.ranked] == ["subject-lora"]
    assert [b.run_name for b in generation.baselines] == ["zero-shot"]
    assert generation.skipped == []

    # One explicit metric ranks across tasks: the runs that never logged it are listed as skipped.
    across = collect(EXPERIMENT, tracking_uri, metric="test_bleu")
    assert across.task is None and [r.run_name for r in across.ranked] == ["subject-lora"]
    assert {r.run_name for r in across.skipped} == {*RANKED, "no-f1"}

    classification = collect(EXPERIMENT, tracking_uri, task="classification")
    assert [r.run_name for r in classification.ranked] == RANKED


def test_a_diverged_run_is_skipped_not_ranked(tracking_uri, tmp_path):
    log_run(tracking_uri, tmp_path, "steady", {"test_f1": 0.5, "trainable_percent": 1.0})
    log_run(tracking_uri, tmp_path, "diverged", {"test_f1": float("nan")})
    result = collect(EXPERIMENT, tracking_uri)
    assert [r.run_name for r in result.ranked] == ["steady"]
    assert [r.run_name for r in result.skipped] == ["diverged"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"experiment": "nope"}, r"'nope' not found in .*; it has: Default, variants"),
        ({"task": "translation"}, r"no finished fine-tune runs of task 'translation'; its tasks: "),
        ({"metric": "test_f2"}, r"logged metric 'test_f2'; they logged: peak_memory_mb, "),
        ({"metric": "val_loss"}, r"'val_loss' is lower-is-better"),
    ],
)
def test_bad_requests_name_what_exists(tracking_uri, variants, arguments, message):
    arguments = {"experiment": EXPERIMENT, **arguments}
    with pytest.raises(CompareError, match=message):
        collect(arguments.pop("experiment"), tracking_uri, **arguments)


def test_experiment_without_finished_finetune_runs(tracking_uri, tmp_path):
    log_run(tracking_uri, tmp_path, "tfidf", {"test_f1": 0.9}, kind="baseline")
    log_run(tracking_uri, tmp_path, "crashed", {"test_f1": 0.9}, status="FAILED")
    with pytest.raises(CompareError, match="no FINISHED fine-tune runs") as err:
        collect(EXPERIMENT, tracking_uri)
    assert "1 baseline (FINISHED), 1 finetune (FAILED)" in str(err.value)
    assert "peftflow run -c CONFIG" in str(err.value)


def test_deleted_experiment_and_unreadable_store(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    client.delete_experiment(ensure_experiment("gone", tracking_uri, tmp_path))
    with pytest.raises(CompareError, match="'gone' is deleted; restore it"):
        collect("gone", tracking_uri)
    with pytest.raises(CompareError, match="cannot read the MLflow store nowhere://x"):
        collect(EXPERIMENT, "nowhere://x")


# --- the report and the comparison run ---------------------------------------------------------


def test_report_holds_table_fronts_left_out_runs_and_plots(tracking_uri, tmp_path, variants):
    out = tmp_path / "report"
    outcome = run_compare(EXPERIMENT, tracking_uri, out, "peftflow compare -e variants", log=False)
    assert outcome.run_id is None
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [REPORT_FILE, CSV_FILE, *PLOT_FILES.values()]
    )
    for plot in PLOT_FILES.values():
        data = (out / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000

    report = (out / REPORT_FILE).read_text()
    assert report.startswith("# Comparison of experiment `variants`")
    assert f"Tracking URI: `{tracking_uri}`" in report and "Date: " in report
    assert "Metric: `test_f1`" in report and "Command: `peftflow compare -e variants`" in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| 1 | full | full | minilm | 0.9500 | 100 | 60.0 | 1,500 | * | *")
    bitfit = "| 4 | bitfit | bitfit | minilm | 0.9000 | 0.5 | 50.0 | 1,600 | * |  |  |"
    assert table[4].startswith(bitfit)
    assert "- train time (s): `head` (20.0 → 0.8000), `no-memory` (30.0 → 0.9300), " in report
    assert "| baseline-tfidf-logreg | tfidf_logreg | classification | 0.9700 |" in report
    assert "- skipped `no-f1`" in report and "(it has: test_accuracy, train_seconds)" in report
    assert f"- dropped `lora` (`{variants['lora-old'][:8]}`" in report and "`k-lora`" in report
    assert f"]({PLOT_FILES['trainable_percent']})" in report


def test_csv_lists_every_row_with_its_role_and_front_flags(tracking_uri, tmp_path, variants):
    run_compare(EXPERIMENT, tracking_uri, tmp_path / "r", "cmd", log=False)
    rows = csv_rows(tmp_path / "r" / CSV_FILE)
    roles = [(r["role"], r["run_name"]) for r in rows]
    assert roles == [("ranked", name) for name in RANKED] + [
        ("skipped", "no-f1"),
        ("dropped", "lora"),
        ("baseline", "baseline-tfidf-logreg"),
    ]
    by_name = {r["run_name"]: r for r in rows if r["role"] == "ranked"}
    assert by_name["bitfit"]["test_f1"] == "0.9"
    flags = ("on_front_trainable_percent", "on_front_train_seconds", "on_front_peak_memory_mb")
    assert [by_name["bitfit"][f] for f in flags] == ["True", "False", "False"]
    assert [by_name["no-memory"][f] for f in flags] == ["False", "True", "False"]
    assert by_name["no-memory"]["peak_memory_mb"] == ""
    assert rows[5]["test_f1"] == "" and rows[6]["run_key"] == "k-lora"


def test_comparison_run_is_logged_and_ignored_next_time(tracking_uri, tmp_path, variants):
    out = tmp_path / "report"
    first = run_compare(EXPERIMENT, tracking_uri, out, "cmd")
    client = MlflowClient(tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.run_name.startswith("compare-") and run.info.run_name.endswith("Z")
    assert run.info.experiment_id == first.comparison.experiment_id
    assert run.data.tags["peftflow.kind"] == "comparison"
    assert run.data.tags["peftflow.compare.metric"] == "test_f1"
    assert run.data.params == {"n_runs": "5", "metric": "test_f1"}
    logged = {a.path for a in client.list_artifacts(first.run_id, "comparison")}
    assert logged == {
        f"comparison/{name}" for name in [REPORT_FILE, CSV_FILE, *PLOT_FILES.values()]
    }

    second = run_compare(EXPERIMENT, tracking_uri, out, "cmd")  # replaces the old report
    assert [r.run_id for r in second.comparison.ranked] == [
        r.run_id for r in first.comparison.ranked
    ]
    assert second.run_id != first.run_id


def test_a_failed_report_leaves_the_previous_one_whole(tracking_uri, tmp_path, variants):
    out = tmp_path / "report"
    run_compare(EXPERIMENT, tracking_uri, out, "first", log=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_plots(comparison, folder):
        raise RuntimeError("disk full")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare, "plot_fronts", broken_plots)
        with pytest.raises(RuntimeError, match="disk full"):
            run_compare(EXPERIMENT, tracking_uri, out, "second", log=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []


def test_report_refuses_to_replace_a_folder_of_other_files(tracking_uri, tmp_path, variants):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(CompareError, match=r"holds files that are not a comparison report"):
        run_compare(EXPERIMENT, tracking_uri, tmp_path / "mine", "cmd", log=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# --- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["compare", "ui"])
def test_new_commands_have_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_cli_compare_prints_the_table_and_writes_the_report(tracking_uri, tmp_path, variants):
    out = tmp_path / "cli-report"
    args = ["compare", "-e", EXPERIMENT, "--tracking-uri", tracking_uri, "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:5] == ["#", "run", "method", "base", "model"]
    assert lines[2].split()[:5] == ["1", "full", "full", "minilm", "0.9500"]
    assert "baseline baseline-tfidf-logreg: test_f1 0.9700" in result.output
    assert "skipped (no test_f1): 1: no-f1" in result.output
    assert "dropped 1 older run(s)" in result.output
    assert f"report: {out / REPORT_FILE}" in result.output
    assert "logged as MLflow run" in result.output and (out / CSV_FILE).exists()


def test_cli_compare_no_log_and_default_folder(tracking_uri, tmp_path, variants):
    args = ["compare", "-e", EXPERIMENT, "--tracking-uri", tracking_uri, "--root", str(tmp_path)]
    result = runner.invoke(app, [*args, "--no-log", "--metric", "test_accuracy"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "outputs" / "compare" / EXPERIMENT / REPORT_FILE).exists()
    assert "logged as" not in result.output
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    kinds = {run.data.tags["peftflow.kind"] for run in client.search_runs([experiment_id])}
    assert "comparison" not in kinds


def test_cli_compare_errors_exit_2_with_the_fix(tracking_uri, variants):
    result = runner.invoke(app, ["compare", "-e", "nope", "--tracking-uri", tracking_uri])
    assert result.exit_code == 2
    assert "not found" in result.output and "Pass one of those to --experiment" in result.output


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.20", False),
        ("example.org", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_ui_argv_for_sqlite_other_databases_and_servers(tmp_path):
    argv = ui_argv(f"sqlite:///{tmp_path}/mlflow.db", "127.0.0.1", 5001, tmp_path)
    assert argv[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert argv[4:] == [
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--host",
        "127.0.0.1",
        "--port",
        "5001",
        "--workers",
        "1",
        "--default-artifact-root",
        (tmp_path / "mlruns").as_uri(),
    ]
    postgres = ui_argv("postgresql://db/mlflow", "127.0.0.1", 5000, tmp_path)
    assert "--default-artifact-root" not in postgres
    with pytest.raises(PeftflowError, match="serves its own UI"):
        ui_argv("http://127.0.0.1:5000", "127.0.0.1", 5000, tmp_path)


def test_cli_ui_refuses_a_remote_host_without_allow_remote(tmp_path):
    result = runner.invoke(app, ["ui", "--root", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "--allow-remote" in result.output and "no login" in result.output


# --- the UI as a real server -------------------------------------------------------------------


def session_members(session_id: int) -> list[int]:
    """Live processes of a session (Linux /proc; zombies are dead and not counted)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_session(process: subprocess.Popen, timeout: float) -> bool:
    """Ctrl-C to peftflow ui; True when it and everything it started are gone in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()
        if not session_members(process.pid):
            return True
        time.sleep(0.2)
    return False


def live_ctrl_c() -> None:
    """In the child, before exec: SIGINT handled by default and not blocked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.server
def test_peftflow_ui_serves_the_store_and_stops_on_ctrl_c(empty_store, tmp_path):
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    port, log = free_port(), tmp_path / "ui.log"
    argv = [sys.executable, "-m", "peftflow.cli", "ui", "--root", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with log.open("w") as handle:
        # A session of its own: every process the UI starts can be found, and killed, by it.
        process = subprocess.Popen(
            [*argv, "--port", str(port)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            # Ctrl-C live as in a terminal, whatever SIGINT disposition or mask the suite's
            # process passes on (both survive exec: an ignored or blocked SIGINT would stay so).
            preexec_fn=live_ctrl_c,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process, log, timeout=90)
        assert f"MLflow UI: http://127.0.0.1:{port}" in log.read_text()
        assert stop_session(process, timeout=30), f"still running:\n{log.read_text()[-3000:]}"
        assert process.wait(5) == 0
    finally:
        for pid in session_members(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.wait(10)
