"""`peftflow ui` in a real browser: Debian's Chromium, headless, driven by Playwright.

A store with a champion and two variants (tiny models, trained by the real flow) is opened
the way a person compares variants. What they look for must be on the page: each run's
dataset with its digest (the DVC md5), where it came from, the model version with alias
`champion` and the gate's reason, and two runs compared on `test_f1`. Screenshots go to
the project's outputs/ui/.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import synthetic_spam_table
from tests.pipeline.test_flow_integration import make_project
from tests.servers import background, free_port, wait_healthy

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path(os.environ.get("PEFTFLOW_CHROMIUM", "/usr/bin/chromium"))
PAGE_TIMEOUT_MS = 60_000  # the 2-core CI machine renders MLflow's UI slowly under load


@pytest.fixture(scope="module")
def store(prefect_server, tiny_models, tmp_path_factory):
    """A champion and a second variant the gate refused, plus the TF-IDF baseline."""
    from flows.finetune import finetune

    root = tmp_path_factory.mktemp("ui") / "project"
    config = make_project(root, synthetic_spam_table(300), tiny_models["llama"], "lora-r4")
    first = finetune(config_path=str(config), root=str(root))
    settings = yaml.safe_load(config.read_text())
    settings["name"], settings["method"]["r"], settings["train"]["epochs"] = "lora-r2", 2, 1
    (root / "r2.yaml").write_text(yaml.safe_dump(settings))
    second = finetune(config_path=str(root / "r2.yaml"), root=str(root), run_baseline=False)
    assert first.promotion.promoted and second.registered.version == "2"
    return root, first, second


@pytest.fixture(scope="module")
def ui_url(store, tmp_path_factory):
    """`peftflow ui` on the store, on 127.0.0.1; the link it prints."""
    root = store[0]
    port, log = free_port(), tmp_path_factory.mktemp("ui-log") / "ui.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "peftflow.cli", "ui", "--root", str(root)]
    with background([*command, "--port", str(port)], env, root, log) as server:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, log, timeout=120)
        printed = re.search(r"MLflow UI: (\S+)", log.read_text())
        yield printed.group(1)


@pytest.fixture(scope="module")
def page(ui_url):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        yield page
        browser.close()


def visit(page, url: str, waits_for: str, shot: Path) -> str:
    """Open ``url``, wait until ``waits_for`` is shown, save a screenshot; the page's text."""
    page.goto(url)
    page.get_by_text(waits_for, exact=False).first.wait_for()
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    return page.inner_text("body")


# The compare page's metrics are a virtualised grid of absolutely placed cells: a metric's
# values are the cells at the height of its name.
METRIC_ROW_JS = """name => {
  const label = [...document.querySelectorAll('a[title="Plot chart"]')]
    .find(link => link.textContent.trim() === name);
  if (!label) return null;
  const top = label.parentElement.style.top;
  return [...document.querySelectorAll('div[style*="position: absolute"]')]
    .filter(cell => cell.style.top === top && cell !== label.parentElement)
    .map(cell => cell.textContent.trim());
}"""


def metric_row(page, name: str) -> list[str]:
    """The values shown for metric ``name`` on the compare page, one per run, in order."""
    page.get_by_title("Plot chart").first.wait_for()
    values = page.evaluate(METRIC_ROW_JS, name)
    assert values, f"no metric {name!r} on the compare page"
    return values


def test_runs_show_their_dataset_digest_source_and_model(store, ui_url, page):
    root, first, second = store
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("integration").experiment_id
    base, view = ui_url.split("/#/")[0], ui_url.split("?", 1)[1]
    assert view == "workflowType=machine_learning"

    # The printed link opens MLflow on its model-training view (runs, models, registry).
    text = visit(page, ui_url, "integration", root / "outputs/ui/experiments.png")
    assert "Model registry" in text and "Judges" not in text

    runs_url = f"{base}/#/experiments/{experiment}/runs?{view}"
    text = visit(page, runs_url, "lora-r2", root / "outputs/ui/runs.png")
    md5 = first.data_md5
    # The Dataset column: each of the three runs with its train split and the DVC md5.
    assert text.count(f"({md5})") >= 3, text
    assert "messages-train-" in text and "lora-r4" in text and "baseline-tfidf-logreg" in text

    run_url = f"{base}/#/experiments/{experiment}/runs/{first.trained.run_id}?{view}"
    text = visit(page, run_url, "About this run", root / "outputs/ui/champion-run.png")
    assert f"({md5})" in text and "finetune.py:finetune" in text  # dataset, MLflow source
    assert re.search(r"tiny-spam\s+v1", text), text  # the registered version of this run


def test_the_champion_version_shows_its_alias_and_the_gates_reason(store, ui_url, page):
    root = store[0]
    base, view = ui_url.split("/#/")[0], ui_url.split("?", 1)[1]
    text = visit(
        page, f"{base}/#/models/tiny-spam/versions/1?{view}", "Aliases", root / "outputs/ui/v1.png"
    )
    assert re.search(r"@\s*champion", text), text
    assert "peftflow.promotion.reason" in text and "no champion yet; candidate test_f1=" in text
    text = visit(
        page, f"{base}/#/models/tiny-spam/versions/2?{view}", "Aliases", root / "outputs/ui/v2.png"
    )
    assert "not promoted" in text or "not shown better" in text or "not better" in text, text
    assert not re.search(r"@\s*champion", text)


def test_two_runs_compared_on_test_f1(store, ui_url, page):
    root, first, second = store
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("integration").experiment_id
    base, view = ui_url.split("/#/")[0], ui_url.split("?", 1)[1]
    ids = [first.trained.run_id, second.trained.run_id]
    url = f'{base}/#/compare-runs?runs=["{ids[0]}","{ids[1]}"]&experiments=["{experiment}"]&{view}'
    visit(page, url, "Run details", root / "outputs/ui/compare.png")
    shown = [float(value) for value in metric_row(page, "test_f1")]
    expected = [first.trained.metrics["test_f1"], second.trained.metrics["test_f1"]]
    assert shown == pytest.approx(expected, abs=1e-3), (shown, expected)
