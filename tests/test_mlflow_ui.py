"""The MLflow UI, as a user opens it after the pipeline ran: `mlflow ui` on the tiny pipeline's
store (the `project` fixture), driven in headless Chromium by Playwright.

Checks what the README tells users to look at: the experiment's training runs, named by model
and dataset, with their dataset; the compare page of the three model runs with `test_macro_f1`
for each; the registered model with its `champion` alias. The compare page's screenshot is kept
in `reports/ui/` (gitignored; CI keeps it as an artifact).

Needs the system's Chromium (Debian's `chromium`; `.ci/run` installs it). Without it the tests
skip, unless HANDBALL_REQUIRE_UI=1 (set by `.ci/run`) makes that a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from conftest import (
    MODELS,
    ROOT,
    champion_name,
    free_port,
    logged_model,
    stop_process_group,
    wait_until_serving,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeout

# ~30 s with the browser and the UI server: make test is at its 10 minutes; CI runs them
pytestmark = [pytest.mark.ui, pytest.mark.slow]

SCREENSHOTS = ROOT / "reports" / "ui"
# Flags for a closed network (no background connections to Google's hosts) and for root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# MLflow 3.17 puts a modal "Detect Issues" guidance pop-up over an experiment's first page
# until it is dismissed once, and opens its assistant panel (a third of the page) on the first
# page a browser loads; it keeps both in localStorage. On a slow machine they appear seconds
# after the page, and while open the pop-up takes every click. The browser starts as one where
# a user dismissed both; should another MLflow version bring them back under other keys, the
# tests click "Got it" and "Close" as a user would.
GUIDANCE_DISMISSED = (
    "localStorage.setItem('mlflow.detectIssues.guidanceShown_v1', 'true');"
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
)


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "no chromium on PATH (Debian: apt-get install chromium)"
    if os.environ.get("HANDBALL_REQUIRE_UI") == "1":
        pytest.fail(f"HANDBALL_REQUIRE_UI=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def mlflow_ui(project):
    """(base URL, repo, params) of `mlflow ui` serving the project's store on a free port."""
    executable = chromium_path()
    repo, state = project
    port = free_port()
    log_path = repo / "mlflow-ui.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "ui",
                "--backend-store-uri",
                f"sqlite:///{repo / 'mlflow.db'}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=repo,
            env=state["env"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers go with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/health", server, log_path, timeout=120)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        yield url, repo, params, executable
    finally:
        stop_process_group(server)


@pytest.fixture(scope="module")
def page(mlflow_ui):
    from playwright.sync_api import sync_playwright

    *_, executable = mlflow_ui
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(30_000)
        page.add_init_script(GUIDANCE_DISMISSED)
        yield page
        browser.close()


def model_runs(repo: Path, params: dict) -> tuple[str, dict]:
    """(experiment id, {model: its latest training run}) of the project's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name(params["mlflow"]["experiment"])
    runs = {}
    for model in MODELS:
        ref = logged_model(repo, model)
        runs[model] = client.get_run(ref["run_id"])
    return exp.experiment_id, runs


def test_experiment_shows_named_training_runs_and_their_dataset(mlflow_ui, page):
    url, repo, params, _ = mlflow_ui
    exp_id, runs = model_runs(repo, params)
    page.goto(f"{url}/#/experiments/{exp_id}")
    # MLflow 3.17 opens every experiment on its GenAI overview until the user picks
    # "Model training" once (the browser remembers it): what the README tells users to do.
    model_training = page.get_by_text("Model training", exact=True).first
    try:
        model_training.click(timeout=10_000)
    except PlaywrightTimeout:  # a guidance pop-up over it (see GUIDANCE_DISMISSED)
        page.get_by_role("button", name="Got it").click()
        model_training.click()
    page.wait_for_url("**/experiments/*/runs*")
    body = page.locator("body")
    dataset = json.loads((repo / "data" / "clean" / "dataset.json").read_text())
    for model, run in runs.items():
        assert run.info.run_name == f"{model} · {dataset['name']}"
        page.get_by_text(run.info.run_name, exact=True).first.wait_for()
    assert "Handball action recognition" in body.inner_text()  # the description
    # the Dataset column: its name and digest (content and split hashes)
    digest = f"{dataset['dataset_hash'][:8]}-{dataset['split_hash'][:8]}"
    page.get_by_text(f"{dataset['name']} ({digest})", exact=True).first.wait_for()
    # the Models column: each logged model under its model's name
    for model in MODELS:
        page.get_by_text(model, exact=True).first.wait_for()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "training-runs.png")
    # reloaded, the experiment stays on its training runs (the choice is remembered)
    page.goto(f"{url}/#/experiments/{exp_id}")
    page.wait_for_url("**/experiments/*/runs*")


# The compare page's metric table is two virtualised grids (names, values) whose cells are
# placed by row (`top`): the values of metric `name` are the value cells in its row.
METRIC_ROW = """(name) => {
  const key = [...document.querySelectorAll('a[title="Plot chart"]')]
    .find(a => a.textContent.trim() === name);
  if (!key) return null;
  let table = key.parentElement;
  while (table && table.querySelectorAll('.ReactVirtualized__Grid').length < 2) {
    table = table.parentElement;
  }
  const top = key.parentElement.style.top;
  return [...table.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
    .filter(d => d.style.top === top && !d.querySelector('a[title="Plot chart"]'))
    .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
    .map(d => d.textContent.trim());
}"""


def test_compare_page_shows_every_models_test_macro_f1(mlflow_ui, page):
    url, repo, params, _ = mlflow_ui
    exp_id, runs = model_runs(repo, params)
    ids = urllib.parse.quote(json.dumps([r.info.run_id for r in runs.values()]))
    experiments = urllib.parse.quote(json.dumps([exp_id]))
    page.goto(f"{url}/#/compare-runs?runs={ids}&experiments={experiments}")
    page.get_by_text("Comparing 3 Runs", exact=False).first.wait_for()
    for run in runs.values():  # the run names head the columns
        page.get_by_text(run.info.run_name, exact=True).first.wait_for()
    with contextlib.suppress(PlaywrightTimeout):  # the assistant panel (see GUIDANCE_DISMISSED)
        page.get_by_role("button", name="Close").first.click(timeout=5_000)
    page.wait_for_timeout(1_000)  # the layout settles
    first = page.locator('a[title="Plot chart"]').first
    first.scroll_into_view_if_needed()
    cell = first.locator("xpath=..").bounding_box()  # the name column's cell
    # scroll the metric values (as a user does, with the wheel) until the row is rendered
    page.mouse.move(cell["x"] + cell["width"] + 60, cell["y"] + cell["height"] / 2)
    values = None
    for _ in range(80):
        values = page.evaluate(METRIC_ROW, "test_macro_f1")
        if values:
            break
        page.mouse.wheel(0, 90)
        page.wait_for_timeout(100)
    assert values, "no test_macro_f1 row on the compare page"
    # columns in the order of the runs in the URL; the UI rounds to 3 decimals
    expected = [run.data.metrics["test_macro_f1"] for run in runs.values()]
    assert [float(v) for v in values] == pytest.approx(expected, abs=6e-4), values
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "compare-runs.png")
    assert (SCREENSHOTS / "compare-runs.png").stat().st_size > 10_000


def test_registered_model_shows_the_champion_alias(mlflow_ui, page):
    from mlflow.tracking import MlflowClient

    url, repo, params, _ = mlflow_ui
    name, alias = champion_name(params), params["compare"]["alias"]
    store = f"sqlite:///{repo / 'mlflow.db'}"
    champion = MlflowClient(tracking_uri=store, registry_uri=store).get_model_version_by_alias(
        name, alias
    )
    page.goto(f"{url}/#/models/{name}")
    row = page.get_by_role("row").filter(
        has=page.get_by_text(f"Version {champion.version}", exact=True)
    )
    row.first.wait_for()
    assert alias in row.first.inner_text()
    others = page.get_by_role("row").filter(has=page.get_by_text("Version ", exact=False))
    for i in range(others.count()):  # the alias is on one version only
        text = others.nth(i).inner_text()
        assert (alias in text) == (f"Version {champion.version}" in text), text
    assert "Handball action classifier" in page.locator("body").inner_text()  # its description
