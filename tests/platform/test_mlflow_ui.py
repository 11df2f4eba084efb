"""The MLflow UI in a real browser, after the smoke pipeline: headless Chromium (Debian's, driven by Selenium
through Debian's chromedriver) opens the tracking server's UI on loopback and finds what a user comes for:
the experiment, the pipeline's run with its teacher and student stage runs nested under it, their test
accuracy as logged, the student's datasets and its ROC figure, and the champion student in the model
registry. Each page checked is saved as a PNG
(``screenshot`` in conftest.py: ``$TCKR_SCREENSHOTS`` or pytest's temporary directory)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import mlflow
import pytest
from mlflow.entities import Run
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.browser

# The network is closed: without the background-networking flags Chromium keeps dialling Google's services.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1920,1200")
WAIT_S = 30  # a page of the UI renders in 1-2 s here: the bound only decides how long a failure takes
# The UI's assistant panel opens itself on a first visit and would cover a third of every page.
CLOSED_ASSISTANT = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false"}


@dataclass
class Pipeline:
    """What the UI must show, read through the tracking API."""

    client: mlflow.MlflowClient
    uri: str
    dataset: str
    experiment_name: str
    experiment_id: str
    parent: Run
    stages: dict[str, Run]
    metrics: dict[str, float]

    def model_name(self, role: str) -> str:
        return f"tckr-{self.dataset}-{role}"


class MlflowUI:
    """The UI as a user meets it: routes of its single-page app, waits for content, clicks."""

    def __init__(self, driver: webdriver.Chrome, uri: str):
        self.driver, self.uri, self.wait = driver, uri, WebDriverWait(driver, WAIT_S)

    def open(self, route: str) -> None:
        self.driver.get(f"{self.uri}/#/{route}")

    def visible(self, by: str, locator: str) -> WebElement:
        return self.wait.until(expected_conditions.visibility_of_element_located((by, locator)),
                               f"not shown within {WAIT_S} s: {locator} on {self.driver.current_url}")

    def click(self, by: str, locator: str) -> None:
        self.wait.until(expected_conditions.element_to_be_clickable((by, locator)),
                        f"not clickable within {WAIT_S} s: {locator} on {self.driver.current_url}").click()


@pytest.fixture(scope="module")
def pipeline(smoke_run) -> Pipeline:
    cfg, outcome, uri = smoke_run
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    [parent] = client.search_runs([experiment.experiment_id], f"tags.`tckr.run_name` = '{outcome.run_dir.name}'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return Pipeline(client, uri, cfg.dataset, experiment.name, experiment.experiment_id, parent,
                    {run.info.run_name: run for run in children}, outcome.metrics)


@pytest.fixture(scope="module")
def ui(chromium, pipeline, tmp_path_factory) -> Iterator[MlflowUI]:
    binary, chromedriver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # Both paths given: Selenium Manager, which would download a browser, is never run.
    service = Service(chromedriver, log_output=str(tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    try:
        driver.get(f"{pipeline.uri}/health")  # the UI's origin, before the app first loads
        for key, value in CLOSED_ASSISTANT.items():
            driver.execute_script("window.localStorage.setItem(arguments[0], arguments[1])", key, value)
        yield MlflowUI(driver, pipeline.uri)
    finally:
        driver.quit()


def grid_cell(ui: MlflowUI, run_name: str, column: str) -> WebElement:
    """The runs table's cell of ``column`` in the row of ``run_name`` (the grid splits a row into a pinned
    and a scrolling part that share the row index)."""
    row = ui.visible(By.LINK_TEXT, run_name).find_element(By.XPATH, "./ancestor::div[@role='row']")
    return ui.driver.find_element(
        By.XPATH, f"//div[@role='row'][@row-index='{row.get_attribute('row-index')}']/div[@col-id='{column}']")


def test_experiment_page_nests_teacher_and_student_under_the_pipeline_run(ui, pipeline, screenshot):
    ui.open("experiments")
    ui.click(By.XPATH, "//div[@role='button'][normalize-space()='Model training']")  # runs, not GenAI traces
    ui.click(By.LINK_TEXT, pipeline.experiment_name)
    parent_name = pipeline.parent.info.run_name
    ui.visible(By.LINK_TEXT, parent_name)
    assert not ui.driver.find_elements(By.LINK_TEXT, "teacher")  # nested: listed once the parent is expanded

    metrics = {role: f"{role}.test_accuracy" for role in ("teacher", "student")}
    ui.click(By.XPATH, "//button[normalize-space()='Columns']")
    ui.visible(By.CSS_SELECTOR, "input[placeholder='Search columns']").send_keys("test_accuracy")
    for metric in metrics.values():
        ui.click(By.XPATH, f"(//*[@data-testid='column-selector-tree']//span[normalize-space()='{metric}'])[1]")
    ui.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    ui.click(By.XPATH, f"//a[normalize-space()='{parent_name}']/ancestor::div[@role='gridcell']//button")  # expand
    for role in metrics:
        ui.visible(By.LINK_TEXT, role)
    screenshot(ui.driver, "experiment-runs")

    listed = {link.text for link in ui.driver.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")}
    assert set(pipeline.stages) <= listed, f"stage runs missing under {parent_name}: {set(pipeline.stages) - listed}"
    for role, metric in metrics.items():
        for run_name in (role, parent_name):  # the pipeline run carries every stage's summary too
            value = grid_cell(ui, run_name, f"metrics.`{metric}`").text
            assert float(value) == pytest.approx(pipeline.metrics[metric]), (run_name, metric, value)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_stage_run_page_shows_the_logged_test_accuracy(ui, pipeline, screenshot, role):
    run_id = pipeline.stages[role].info.run_id
    ui.open(f"experiments/{pipeline.experiment_id}/runs/{run_id}")
    ui.visible(By.XPATH, f"//h2[normalize-space()='{role}']")
    metric = f"{role}.test_accuracy"
    # The overview's metrics table: a row whose first cell names the metric and whose second holds its value.
    value = ui.visible(By.XPATH, f"//div[@role='row'][div[@role='cell'][1][normalize-space()='{metric}']]"
                                 "/div[@role='cell'][2]")
    parent = ui.visible(By.XPATH, f"//a[normalize-space()='{pipeline.parent.info.run_name}']")
    # The pipeline's own version: the first (other tests may register the same run's model again).
    version = min(pipeline.client.search_model_versions(f"run_id = '{run_id}'"), key=lambda v: int(v.version))
    registered = ui.visible(By.CSS_SELECTOR, f"a[href$='#/models/{version.name}/versions/{version.version}']")
    screenshot(ui.driver, f"{role}-run")

    assert float(value.text) == pytest.approx(pipeline.metrics[metric])
    assert parent.get_attribute("href").endswith(f"/runs/{pipeline.parent.info.run_id}")
    assert version.name == pipeline.model_name(role)
    assert registered.text.startswith(version.name)


def test_registry_shows_the_champion_student(ui, pipeline, screenshot):
    name = pipeline.model_name("student")
    champion = pipeline.client.get_model_version_by_alias(name, "champion")
    ui.open(f"models/{name}")
    ui.visible(By.XPATH, f"//h2[normalize-space()='{name}']")
    # Aliases and version tags are both tags: role=status, titled by the alias or the tag's key.
    alias = ui.visible(By.XPATH, "//div[@role='status'][@title='champion']")
    screenshot(ui.driver, "registry-student")

    row = alias.find_element(By.XPATH, "./ancestor::div[@role='row']")
    assert row.find_element(By.XPATH, ".//a[starts-with(normalize-space(), 'Version')]").text == \
        f"Version {champion.version}"
    accuracy = row.find_element(By.XPATH, ".//div[@role='status'][@title='accuracy']").text.replace("\n", "")
    assert accuracy == f"accuracy: {champion.tags['accuracy']}"


def test_student_run_page_shows_its_datasets_and_its_roc(ui, pipeline, screenshot):
    """From the registry to the student's run: the data it learned from (the synthetic set) and was tested on,
    and the attack's ROC curve for it, as an image the artifact view renders."""
    run_id = pipeline.stages["student"].info.run_id
    ui.open(f"experiments/{pipeline.experiment_id}/runs/{run_id}")
    ui.visible(By.XPATH, "//h2[normalize-space()='student']")
    ui.visible(By.XPATH, f"//*[contains(normalize-space(text()), '{pipeline.dataset}/synthetic-tckr')]")
    screenshot(ui.driver, "student-run-datasets")

    ui.click(By.XPATH, "//*[@role='tab'][normalize-space()='Artifacts']")  # the figure the attack logged here
    ui.click(By.XPATH, "//*[normalize-space(text())='mia']")
    ui.click(By.XPATH, "//*[normalize-space(text())='roc.png']")
    ui.visible(By.XPATH, "//*[normalize-space(text())='mia/roc.png']")  # the preview's title
    # The preview renders the figure itself (from a blob: URL): 4.5 x 4.5 in at 120 dpi.
    ui.wait.until(lambda driver: driver.execute_script(
        "return [...document.images].some(i => i.complete && i.naturalWidth === 540 && i.naturalHeight === 540)"),
        "the ROC figure is not rendered")
    screenshot(ui.driver, "student-run-roc")
