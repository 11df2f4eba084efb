"""Shared fixtures: small real datasets cut from Fashion-MNIST, an isolated MLflow store."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

# Before any library import: no hub, no progress-bar noise in test logs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["TCKR_CACHE"] = __import__("tempfile").mkdtemp(prefix="tckr-cache-")  # never the user's cache
# Under pytest-xdist (`make test`) the workers share the cores: each worker's torch, and every stage process it
# starts, gets its share of them instead of all of them (oversubscribed OpenMP threads spin against each other).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, os.cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tckr.data.ingest import FASHION_MNIST_CLASSES, _read_idx, fashion_mnist_dir  # noqa: E402


@pytest.fixture(scope="session")
def fmnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """40 train and 10 test images per class of real Fashion-MNIST."""
    root = fashion_mnist_dir()
    out = {}
    for split, prefix, per_class in (("train", "train", 40), ("test", "t10k", 10)):
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
        out[split] = images[keep], labels[keep].astype(np.int64)
    return out


@pytest.fixture(scope="session")
def fmnist_head() -> tuple[np.ndarray, np.ndarray]:
    """The first 1,500 real Fashion-MNIST train images in file order (classes mixed, as drawn)."""
    root = fashion_mnist_dir()
    return (_read_idx(root / "train-images-idx3-ubyte.gz")[:1500],
            _read_idx(root / "train-labels-idx1-ubyte.gz")[:1500].astype(np.int64))


def write_imagefolder(root: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    for split, (images, labels) in arrays.items():
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / FASHION_MNIST_CLASSES[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:05d}.png")
    return root


@pytest.fixture
def imagefolder_dir(tmp_path, fmnist_arrays) -> Path:
    return write_imagefolder(tmp_path / "imagefolder", fmnist_arrays)


def make_dataset_dict(arrays, image_column="image", label_column="label", string_labels=False):
    import datasets

    label_feature = (datasets.Value("string") if string_labels
                     else datasets.ClassLabel(names=FASHION_MNIST_CLASSES))
    splits = {}
    for split, (images, labels) in arrays.items():
        values = [FASHION_MNIST_CLASSES[i] for i in labels] if string_labels else labels.tolist()
        splits[split] = datasets.Dataset.from_dict(
            {image_column: [Image.fromarray(image) for image in images], label_column: values},
            features=datasets.Features({image_column: datasets.Image(), label_column: label_feature}))
    return datasets.DatasetDict(splits)


@pytest.fixture
def saved_dataset_dir(tmp_path, fmnist_arrays) -> Path:
    path = tmp_path / "saved"
    make_dataset_dict(fmnist_arrays, string_labels=True).save_to_disk(str(path))
    return path


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


USER_DEBIAN = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tckr" / "debian"


@functools.cache
def find_chromium() -> tuple[str, str]:
    """Debian's Chromium and its chromedriver (``make setup``: scripts/install-tools.sh), installed system-wide
    or unpacked into the user's cache; both started once with ``--version``. LookupError says what is wrong."""
    browser = shutil.which("chromium") or shutil.which("chromium", path=str(USER_DEBIAN / "usr" / "lib" / "chromium"))
    driver = shutil.which("chromedriver") or shutil.which("chromedriver", path=str(USER_DEBIAN / "usr" / "bin"))
    if not (browser and driver):
        raise LookupError("needs Debian's chromium and chromium-driver (`make tools` installs them)")
    for binary in (browser, driver):
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:  # unpacked without root: a shared library of the system may be missing
            last_line = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
            raise LookupError(f"{binary} does not start ({last_line}): install chromium and chromium-driver "
                              "with apt as root")
    return browser, driver


SMOKE_RUNS = {"smoke_run", "privimage_smoke_run"}
# The modules whose tests read a smoke run: one pytest-xdist worker runs them all, so each run is made once.
SMOKE_RUN_MODULES = {"tests/pipelines/test_tckr_pipeline.py", "tests/pipelines/test_privimage_pipeline.py",
                     "tests/platform/test_mlflow_ui.py"}
# Modules of minutes (each runs a pipeline from start to end): they, and the smoke runs, start first, so that no
# worker starts one while the others have run out of work.
LONG_MODULES = SMOKE_RUN_MODULES | {"tests/test_dvc.py", "tests/platform/test_rehearse.py",
                                    "tests/faults/test_kill_stages.py", "tests/faults/test_outages.py"}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_xdist_make_scheduler(config, log):
    """`make test`'s workers (pytest-xdist) take whole modules (a module's fixtures are made once, and DVC's tests
    build on each other's work), and the modules that read a smoke run all go to one worker: a session fixture is
    made once per worker that needs it, and each run takes minutes."""
    from xdist.scheduler import LoadFileScheduling

    class ModulesAndSmokeRuns(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "smoke runs" if _module(nodeid) in SMOKE_RUN_MODULES else _module(nodeid)

    return ModulesAndSmokeRuns(config, log)


def pytest_collection_modifyitems(config, items):
    """The long modules first; tests marked ``gpu`` skip cleanly on machines without CUDA (CI, laptops), tests
    marked ``browser`` on machines without Chromium. Markers, not keywords: a keyword also matches a directory of the
    same name."""
    items.sort(key=lambda item: _module(item.nodeid) not in LONG_MODULES)  # stable: in-module order kept
    for item in items:
        module = _module(item.nodeid)
        if SMOKE_RUNS & set(getattr(item, "fixturenames", ())) and module not in SMOKE_RUN_MODULES:
            raise pytest.UsageError(f"{item.nodeid} reads a smoke run: add {module} to SMOKE_RUN_MODULES "
                                    "(tests/conftest.py) so that pytest-xdist makes each run once")
    reasons = {}
    if not torch.cuda.is_available():
        reasons["gpu"] = "needs a CUDA GPU"
    if any(item.get_closest_marker("browser") for item in items):
        try:
            find_chromium()
        except LookupError as error:
            reasons["browser"] = str(error)
    for item in items:
        for marker, reason in reasons.items():
            if item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of the Chromium binary and chromedriver (tests that use it are marked ``browser``)."""
    return find_chromium()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory) -> Path:
    """``$TCKR_SCREENSHOTS`` if set (CI keeps that directory), else pytest's temporary directory."""
    chosen = os.environ.get("TCKR_SCREENSHOTS")
    directory = Path(chosen).resolve() if chosen else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def screenshot(request, screenshot_dir):
    """``screenshot(driver, name)`` saves the browser's page as ``name.png`` in ``screenshot_dir``; the terminal
    summary lists every one saved (recorded on the test's report, so it reaches the summary from xdist workers)."""

    def save(driver, name: str) -> Path:
        path = screenshot_dir / f"{name}.png"
        if not driver.save_screenshot(str(path)):
            raise OSError(f"the browser did not write {path}")
        request.node.user_properties.append(("screenshot", str(path)))
        return path

    return save


def pytest_terminal_summary(terminalreporter, config):
    saved = [value for reports in terminalreporter.stats.values() for report in reports
             for key, value in getattr(report, "user_properties", ()) if key == "screenshot"
             and getattr(report, "when", None) == "call"]
    if saved:
        terminalreporter.section("screenshots")
        for path in saved:
            terminalreporter.write_line(path)


@pytest.fixture(autouse=True)
def _isolated_tracking(monkeypatch):
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: keep one test's store out of the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A real SeaweedFS S3 endpoint on a free loopback port, with keys generated for this session."""
    from tckr.platform.services import start_seaweedfs

    server, endpoint = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_store):
    """A real MLflow tracking server (sqlite backend) proxying artifacts to ``s3_store``; its URI."""
    from tckr.platform.services import start_mlflow

    server, uri = start_mlflow(tmp_path_factory.mktemp("mlflow"), s3_store)
    yield uri
    server.stop()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, mlflow_server):
    """The smoke pipeline through kfp.local, tracked by ``mlflow_server``: (config, outcome, tracking URI)."""
    from tckr.pipelines.compile import local_pipeline
    from tckr.platform.runner import run_local
    from tckr.recipes.config import load_config

    cfg = load_config("smoke")
    outcome = run_local(cfg, local_pipeline(cfg), tmp_path_factory.mktemp("smoke") / "runs", tracking_uri=mlflow_server)
    return cfg, outcome, mlflow_server


@pytest.fixture(scope="session")
def privimage_smoke_run(tmp_path_factory, mlflow_server):
    """The PrivImage smoke pipeline through kfp.local, tracked by ``mlflow_server``: (config, outcome, URI)."""
    from tckr.pipelines.compile import local_pipeline
    from tckr.platform.runner import run_local
    from tckr.recipes.config import load_config

    cfg = load_config("smoke-privimage")
    outcome = run_local(cfg, local_pipeline(cfg), tmp_path_factory.mktemp("privimage") / "runs",
                        tracking_uri=mlflow_server)
    return cfg, outcome, mlflow_server
