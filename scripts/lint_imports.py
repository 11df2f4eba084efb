"""Check the import contracts in pyproject.toml ([tool.importlinter]) over the whole ``tckr`` package.

``components/`` and ``pipelines/`` install as ``tckr.components`` and ``tckr.pipelines`` (setuptools
package-dir), but import-linter reads a package from one directory tree; so the three are copied into
one ``tckr`` tree for the check, which then sees exactly the modules the installed package has."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns("__pycache__", "*.yaml")

with tempfile.TemporaryDirectory(prefix="tckr-lint-imports-") as folder:
    package = Path(folder) / "tckr"
    shutil.copytree(ROOT / "src" / "tckr", package, ignore=IGNORED)
    for name in ("components", "pipelines"):
        shutil.copytree(ROOT / name, package / name, ignore=IGNORED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, os.environ.get("PYTHONPATH", "")])}
    lint = Path(sys.executable).with_name("lint-imports")
    sys.exit(subprocess.run([str(lint), "--no-cache", str(ROOT / "pyproject.toml")], env=env, cwd=folder).returncode)
