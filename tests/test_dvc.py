"""DVC end to end on the smoke profiles: `dvc repro` runs the stages, `dvc push` sends data and weights to
a real SeaweedFS remote, a teammate's fresh git clone gets them back byte-identical with `dvc pull` and runs an
experiment with `dvc exp run --set-param`, only the stages downstream of a change run again, and PrivImage's
stages (privimage/dvc.yaml) build on TCKR's ingest."""

import ast
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tckr.platform.objectstore import file_sha256, list_keys, s3_client
from tckr.platform.services import DVC_BUCKET
from tckr.recipes.config import load_config

REPO = Path(__file__).resolve().parents[1]
# Each recipe's DVC project: its dvc.yaml and params.yaml live in this directory, resolved from this profile.
DVC_RECIPES = {"tckr": ("", "demo"), "privimage": ("privimage", "demo-privimage")}
UPSTREAM = ("ingest", "teacher", "caption", "generator", "finetune")
DOWNSTREAM = ("generate", "student", "attack", "register")
# What a teammate pulls instead of recomputing: the prepared data, captions, the base generator, the
# LoRA adapter, the synthetic set and the teacher/student weights.
WEIGHTS = ("outputs/data/dataset.json", "outputs/teacher/model.safetensors", "outputs/captions/captions.json",
           "outputs/generator", "outputs/adapter/pytorch_lora_weights.safetensors", "outputs/synthetic",
           "outputs/student/model.safetensors")


@pytest.mark.unit
@pytest.mark.parametrize("recipe", DVC_RECIPES)
def test_dvc_stages_are_the_declared_stages_with_the_demo_profile(recipe):
    """params.yaml is the demo profile resolved, every setting written out (the sections' derived seeds too: a
    DVC stage depends on its sections' values); each DVC stage is a declared stage of its recipe, reads exactly
    the sections its declaration reads and passes every declared input and output."""
    directory, profile = DVC_RECIPES[recipe]
    params = load_config(str(REPO / directory / "params.yaml"))
    resolved = load_config(profile).model_dump(mode="json", exclude={"profile"})
    assert params.model_dump(mode="json", exclude={"profile"}) == resolved
    written = yaml.safe_load((REPO / directory / "params.yaml").read_text())
    assert {key: value for key, value in written.items() if key != "profile"} == resolved
    registry = importlib.import_module(f"tckr.recipes.{recipe}.stages").STAGES
    stages = yaml.safe_load((REPO / directory / "dvc.yaml").read_text())["stages"]
    assert set(stages) <= set(registry.names())
    for name, stage in stages.items():
        assert stage["cmd"].startswith(f"tckr stage {name} --profile params.yaml "), name
        declared = registry[name]
        sections = list(params.model_fields) if declared.sections == ("*",) else list(declared.sections)
        assert stage["params"] == sections, name
        ports = {port: kind for port, kind in (declared.inputs | declared.outputs).items() if not kind.many}
        assert all(f"--{port.replace('_', '-')} " in stage["cmd"] for port in ports), name


def _paths(entries: list) -> list[str]:
    """dvc.yaml's outs/deps entries (a path, or {path: options}) as paths."""
    return sorted(entry if isinstance(entry, str) else next(iter(entry)) for entry in entries)


@pytest.mark.unit
@pytest.mark.parametrize("recipe", DVC_RECIPES)
def test_the_committed_lock_is_this_pipelines_and_hashes_every_output(recipe):
    """Each recipe's dvc.lock (its demo's last `make repro`, the outputs sent to the remote with `make publish`)
    records every stage its dvc.yaml declares with the command and parameter sections it runs, and a hash for each
    of its outputs: what `make pull` fetches. Its code and parameter hashes may lag the working tree; `dvc status`
    then names the stages `make repro` would re-run."""
    directory, _ = DVC_RECIPES[recipe]
    lock = yaml.safe_load((REPO / directory / "dvc.lock").read_text())
    stages = yaml.safe_load((REPO / directory / "dvc.yaml").read_text())["stages"]
    assert set(lock["stages"]) == set(stages)
    for name, stage in stages.items():
        locked = lock["stages"][name]
        assert " ".join(locked["cmd"].split()) == " ".join(stage["cmd"].split()), name
        assert sorted(locked["params"]["params.yaml"]) == sorted(stage["params"]), name
        assert sorted(dep["path"] for dep in locked["deps"]) == _paths(stage["deps"]), name
        outs = {out["path"]: out for out in locked["outs"]}
        assert sorted(outs) == _paths(stage.get("outs", []) + stage.get("metrics", [])), name
        assert all(out["md5"] and out["size"] > 0 for out in outs.values()), name


@pytest.mark.unit
def test_a_code_dependency_is_hashed_from_its_sources_alone():
    """Bytecode records each source's modification time: a lock that hashed ``__pycache__`` would call every stage
    stale on any other clone of the same commit."""
    bytecode, source = "src/tckr/core/__pycache__/seeds.cpython-312.pyc", "src/tckr/core/seeds.py"
    checked = subprocess.run([str(Path(sys.prefix) / "bin" / "dvc"), "check-ignore", bytecode, source], cwd=REPO,
                             capture_output=True, text=True, check=True)
    assert checked.stdout.split() == [bytecode]


CONCERNS = ("core", "data", "training", "generators", "privacy", "platform")  # a DVC dep is the whole package


def _module_file(name: str) -> Path | None:
    path = REPO / "src" / Path(*name.split("."))
    return next((file for file in (path / "__init__.py", path.with_suffix(".py")) if file.is_file()), None)


def _imports(tree: ast.AST) -> set[str]:
    """The tckr modules a piece of code imports, anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("tckr") and _module_file(name)}


def _code_of(recipe: str, stage) -> list[str]:
    """What a DVC stage must depend on: the modules its function imports or calls into, and everything those
    import (an over-approximation: whole modules are followed), as concern packages and recipe files."""
    module = inspect.getmodule(stage.run)
    body = ast.parse(textwrap.dedent(inspect.getsource(stage.run)))
    used = {node.id for node in ast.walk(body) if isinstance(node, ast.Name)}
    todo = _imports(body) | {node.module for node in ast.parse(Path(module.__file__).read_text()).body
                             if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tckr")
                             and any((alias.asname or alias.name) in used for alias in node.names)}
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen and name != module.__name__:
            seen.add(name)
            todo |= _imports(ast.parse(_module_file(name).read_text()))
    paths = set()
    for name in seen | {module.__name__, f"tckr.recipes.{recipe}.stages"}:
        parts = name.split(".")
        if len(parts) > 1 and parts[1] in CONCERNS:
            paths.add(f"src/tckr/{parts[1]}")
        elif name not in ("tckr", "tckr.recipes"):
            paths.add(str(_module_file(name).relative_to(REPO)))
    return sorted(paths)


@pytest.mark.unit
@pytest.mark.parametrize("recipe", DVC_RECIPES)
def test_every_dvc_stage_depends_on_the_code_it_runs(recipe):
    """Editing a stage's code re-runs it (and only the stages whose code reaches that file)."""
    directory, _ = DVC_RECIPES[recipe]
    prefix = "../" if directory else ""
    registry = importlib.import_module(f"tckr.recipes.{recipe}.stages").STAGES
    for name, stage in yaml.safe_load((REPO / directory / "dvc.yaml").read_text())["stages"].items():
        code = [dep.removeprefix(prefix) for dep in stage["deps"] if dep.removeprefix(prefix).startswith("src/")]
        assert code == _code_of(recipe, registry[name]), name
        # what a stage reads from another's model directory is declared too (the architecture card with the weights)
        for dep in stage["deps"]:
            if dep.endswith("/model.safetensors"):
                assert dep.replace("model.safetensors", "model.json") in stage["deps"], name


@pytest.mark.unit
def test_both_recipes_read_one_ingested_dataset():
    """privimage/dvc.yaml has no ingest of its own: its stages read ../outputs/data, so the ingest settings must
    be TCKR's, and LiRA attacks the same population in both recipes."""
    tckr, privimage = (load_config(str(REPO / directory / "params.yaml")) for directory, _ in DVC_RECIPES.values())
    assert (tckr.dataset, tckr.image_size, tckr.ingest) == (privimage.dataset, privimage.image_size, privimage.ingest)
    stages = yaml.safe_load((REPO / "privimage" / "dvc.yaml").read_text())["stages"]
    assert "ingest" not in stages and all("--data ../outputs/data " in stage["cmd"] for stage in stages.values()
                                          if "--data " in stage["cmd"])


def _digests(root: Path) -> dict[str, str]:
    files = {}
    for entry in WEIGHTS:
        path = root / entry
        for file in sorted(path.rglob("*") if path.is_dir() else [path]):
            if file.is_file():
                files[str(file.relative_to(root))] = file_sha256(file)
    return files


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory, s3_store):
    """A git + DVC project with the repository's dvc.yaml, the smoke profile as params.yaml and the
    remote pointed at the test store (endpoint in config.local, keys only in the environment)."""
    root = tmp_path_factory.mktemp("dvc-project")
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "Makefile", root / "Makefile")
    for directory, profile in (("", "smoke"), ("privimage", "smoke-privimage")):
        (root / directory).mkdir(exist_ok=True)
        shutil.copy(REPO / directory / "dvc.yaml", root / directory / "dvc.yaml")
        params = load_config(profile).model_dump(mode="json") | {"profile": "params"}
        (root / directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= s3_store.credentials.env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}",
                                         "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}

    def run(*command: str, stdout_only: bool = False, cwd: Path = root, fails: bool = False) -> str:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
        assert (done.returncode != 0) == fails, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n" \
                                                f"{done.stderr}"
        return done.stdout if stdout_only else done.stdout + done.stderr

    (root / ".gitignore").write_text("mlruns.db\nmlartifacts/\n")
    run("git", "init", "-q")
    run("dvc", "remote", "modify", "--local", "storage", "endpointurl", s3_store.url)
    return root, run


@pytest.mark.long
def test_a_teammates_clone_pulls_the_weights_byte_identical(dvc_project, s3_store):
    root, run = dvc_project
    log = run("dvc", "repro")
    for stage in (*UPSTREAM, *DOWNSTREAM):
        assert f"Running stage '{stage}'" in log
    # What DVC reads from the declared files (PrivImage's, in privimage/dvc.yaml, do not exist yet).
    shown = json.loads(run("dvc", "metrics", "show", "--json", stdout_only=True))
    metrics = {k: v for path, file in next(iter(shown.values()))["data"].items() if not path.startswith("privimage/")
               for k, v in file["data"].items()}
    assert 0.0 <= metrics["student.mia.auc"] <= 1.0 and 0.0 <= metrics["teacher.mia.tpr_at_1pct_fpr"] <= 1.0
    assert metrics["student.aop"] > 0 and metrics["teacher.test_accuracy"] > 0.1
    assert metrics["student.registry_version"] == 1  # registered in this project's MLflow store
    before = _digests(root)
    assert len(before) > 10

    run("dvc", "push", "--with-deps", "dvc.yaml")  # as `make publish` does
    assert any(key.startswith("store/files/md5/") for key in list_keys(s3_client(s3_store), DVC_BUCKET, "store/"))
    # A teammate: a fresh clone of the commit (dvc.lock in it, no outputs, no cache), the remote's endpoint in
    # its own config.local, then `make pull` (its prerequisites taken as done: this venv, the test's store is up).
    run("git", "add", "-A")
    run("git", "-c", "user.name=tckr", "-c", "user.email=tckr@localhost", "commit", "-qm", "demo outputs")
    clone = root.parent / f"{root.name}-teammate"
    run("git", "clone", "-q", str(root), str(clone))
    assert not any((clone / weights).exists() for weights in WEIGHTS) and (clone / "dvc.lock").is_file()
    pull = ("make", "--old-file=setup", "--old-file=s3-up", "pull", f"VENV={sys.prefix}")
    # The remote unreachable, then its bucket missing: `make pull` says which within seconds and fetches nothing.
    for setting, value, says in (("endpointurl", "http://127.0.0.1:9", "Could not connect to the"),  # nobody there
                                 ("url", "s3://no-such-bucket/store", "The specified bucket does not exist")):
        run("dvc", "remote", "modify", "--local", "storage", "endpointurl", s3_store.url, cwd=clone)
        run("dvc", "remote", "modify", "--local", "storage", setting, value, cwd=clone)
        started = time.monotonic()
        assert says in run(*pull, cwd=clone, fails=True)
        assert time.monotonic() - started < 90 and not any((clone / weights).exists() for weights in WEIGHTS)
    run("dvc", "remote", "modify", "--local", "--unset", "storage", "url", cwd=clone)
    run(*pull, cwd=clone)
    assert _digests(clone) == before
    assert "up to date" in run("dvc", "status", "dvc.yaml", cwd=clone).lower()
    # One parameter changed there: only what is downstream of it is out of date.
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["attack"]["seed"] += 1
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = {line.split(":")[0] for line in run("dvc", "status", "dvc.yaml", cwd=clone).splitlines()
             if line and not line.startswith((" ", "\t"))}
    assert stale == {"attack", "register"}, stale
    # An experiment with a parameter set on the command line runs in the clone without touching the workspace.
    run("git", "checkout", "--", "params.yaml", cwd=clone)
    log = run("dvc", "exp", "run", "--set-param", f"attack.seed={params['attack']['seed']}", cwd=clone)
    assert "Running stage 'attack'" in log and "Running stage 'teacher'" not in log
    assert len(run("dvc", "exp", "list", "--name-only", stdout_only=True, cwd=clone).split()) == 1
    ran = yaml.safe_load((clone / "params.yaml").read_text())  # the experiment's workspace: its params, metrics
    assert ran["attack"]["seed"] == params["attack"]["seed"]
    assert "up to date" in run("dvc", "status", "dvc.yaml", cwd=clone).lower()


@pytest.mark.long
def test_changed_generation_reruns_only_downstream(dvc_project):
    """A teammate who pulled the weights changes generation: pretraining and fine-tuning are skipped."""
    root, run = dvc_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["generate"]["seed"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    teacher = file_sha256(root / "outputs/teacher/model.safetensors")
    log = run("dvc", "repro")
    for stage in UPSTREAM:
        assert f"Stage '{stage}' didn't change, skipping" in log
        assert f"Running stage '{stage}'" not in log
    for stage in ("generate", "student"):  # DVC goes on past the student only if its weights changed
        assert f"Running stage '{stage}'" in log
    assert file_sha256(root / "outputs/teacher/model.safetensors") == teacher
    assert "up to date" in run("dvc", "status", "dvc.yaml").lower()


@pytest.mark.long
def test_edited_code_marks_the_stages_that_run_it(dvc_project):
    """Distillation's code changed: the student is out of date, the teacher and generation are not."""
    root, run = dvc_project
    distill = root / "src" / "tckr" / "recipes" / "tckr" / "distill.py"
    original = distill.read_text()
    distill.write_text(original + "\n# edited\n")
    status = run("dvc", "status", "dvc.yaml")
    assert "student:" in status and "src/tckr/recipes/tckr/distill.py" in status
    assert "teacher:" not in status and "generate:" not in status and "ingest:" not in status
    distill.write_text(original)
    assert "up to date" in run("dvc", "status", "dvc.yaml").lower()


@pytest.mark.long
def test_privimage_stages_build_on_the_shared_ingest(dvc_project):
    """`dvc repro privimage/dvc.yaml` reuses TCKR's prepared data and spends no more than its target epsilon."""
    root, run = dvc_project
    log = run("dvc", "repro", "privimage/dvc.yaml")
    assert "Stage 'ingest' didn't change, skipping" in log
    for stage in yaml.safe_load((root / "privimage" / "dvc.yaml").read_text())["stages"]:
        assert f"Running stage 'privimage/dvc.yaml:{stage}'" in log, stage
    metrics = {k: v for file in (root / "privimage" / "metrics").glob("*.json")
               for k, v in json.loads(file.read_text()).items()}
    target = load_config("smoke-privimage").privacy.target_epsilon
    assert 0.99 * target <= metrics["privimage.epsilon"] <= target
    assert metrics["classifier.registry_version"] == 1 and 0.0 <= metrics["privimage.mia.auc"] <= 1.0
    assert not list((root / "privimage" / "outputs" / "generator").glob("*checkpoint*"))
    assert "up to date" in run("dvc", "status", "privimage/dvc.yaml").lower()
