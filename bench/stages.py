"""Run pipeline stages as DVC runs them, with overrides, and time them: what the trade-off and scaling studies share.

Each stage's command is the one ``dvc.yaml`` declares (the single declaration of a stage's inputs and outputs), with
``outputs/<folder>`` resolved to the study's own folder for what this point re-made and to ``--inputs`` (a finished
``make repro``'s ``outputs/``) for everything else, and ``--set KEY=VALUE`` overrides appended. A point whose
metrics file exists is not run again, so a study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from measure import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def study_arguments(parser: argparse.ArgumentParser, out: str, only: str | None = None) -> None:
    """The options every study takes: where the finished demo's outputs are, with which profile they were made,
    the work folder its points run in, which part to run (``only``: its help; None, a study run whole) and where
    its JSON goes."""
    parser.add_argument("--inputs", type=Path, default=ROOT / "outputs", help="a finished `make repro`'s outputs/")
    parser.add_argument("--profile", type=Path, default=ROOT / "params.yaml", help="the profile those were made with")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tckr-studies"))
    if only is not None:
        parser.add_argument("--only", default="", help=only)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / out)


def provenance(inputs: Path, profile: Path) -> dict:
    """Where a study's figures come from: the code, the machine, the demo outputs it started from (each point keeps
    its own stage folder and timings under the study's work directory)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted_changes": bool(git("status", "--porcelain")),
            "cpu": cpu_model(), "cores": os.cpu_count(), "inputs": str(inputs),
            "profile": str(profile), "written": datetime.now(UTC).isoformat(timespec="seconds")}


def _folder(path: str) -> str | None:
    """``outputs/teacher/model.json`` -> ``teacher``; None for anything outside ``outputs/``."""
    parts = Path(path).parts
    return parts[1] if len(parts) > 1 and parts[0] == "outputs" else None


def produced_by(stage: str) -> set[str]:
    """The ``outputs/`` folders a stage writes (its ``outs:`` in dvc.yaml)."""
    outs = [next(iter(out)) if isinstance(out, dict) else out for out in DVC[stage].get("outs", [])]
    return {folder for folder in map(_folder, outs) if folder}


def untracked(model: Path, folder: Path) -> Path:
    """An input model as a point may read it: a model logged to MLflow names its logged model
    (``logged_model.json``), which lives in the store of the run that made it, not in the point's own; the point
    gets a mirror of the folder without that file, as a model that was never logged (so the attack, say, skips
    linking its figures to it)."""
    if not (model / "logged_model.json").is_file():
        return model
    mirror = folder / "inputs" / model.name
    mirror.mkdir(parents=True, exist_ok=True)
    for entry in model.iterdir():
        if entry.name != "logged_model.json" and not (mirror / entry.name).exists():
            (mirror / entry.name).symlink_to(entry.resolve())
    return mirror


@dataclass(frozen=True)
class Point:
    """One configuration of the study: the stages it re-runs, in order, with its overrides."""

    name: str
    stages: tuple[str, ...]
    settings: tuple[tuple[str, object], ...]

    @classmethod
    def varying(cls, key: str, value: object, stages: tuple[str, ...], fixed: dict) -> Point:
        """The point where ``key`` is ``value`` and ``fixed`` holds, named after both (its work folder)."""
        name = f"{key}={value}" + "".join(f",{k}={v}" for k, v in sorted(fixed.items()))
        return cls(name, stages, tuple(sorted({**fixed, key: value}.items())))

    def command(self, stage: str, inputs: Path, folder: Path, profile: Path) -> list[str]:
        remade = set().union(*(produced_by(s) for s in self.stages[: self.stages.index(stage) + 1]))
        command = []
        for word in shlex.split(DVC[stage]["cmd"]):
            name = _folder(word)
            if word == "tckr":
                word = str(Path(sys.executable).parent / "tckr")
            elif word == "params.yaml":
                word = str(profile)
            elif word.startswith("metrics/"):
                word = str(folder / word)
            elif name:
                relative = Path(word).relative_to("outputs")
                word = str(folder / "outputs" / relative if name in remade else untracked(inputs / relative, folder))
            command.append(word)
        for key, value in self.settings:
            command += ["--set", f"{key}={json.dumps(value)}"]
        return command

    def run(self, inputs: Path, work: Path, profile: Path) -> dict:
        """Run (or read back) each stage; returns the merged metrics and each stage's wall seconds (the process's
        whole life: start-up, model loading and tracking included, as a user waits for it)."""
        folder = work / self.name
        seconds, metrics = {}, {}
        for stage in self.stages:
            done = folder / "metrics" / f"{stage}.json"
            timing = folder / "metrics" / f"{stage}.seconds"
            if not done.exists():
                done.parent.mkdir(parents=True, exist_ok=True)
                command = self.command(stage, inputs, folder, profile)
                print(f"[{self.name}] {stage}: {shlex.join(command)}", file=sys.stderr, flush=True)
                # A fresh generator cache (a cached base generator would not be trained) and tracking in the
                # point's own folder (mlruns.db there), as a first run on a new machine.
                env = {**os.environ, "TCKR_CACHE": str(work / "cache" / self.name)}
                env.pop("MLFLOW_TRACKING_URI", None)
                started = time.perf_counter()
                subprocess.run(command, cwd=folder, env=env, check=True)
                timing.write_text(f"{time.perf_counter() - started:.2f}\n")
            seconds[stage] = float(timing.read_text())
            metrics.update(json.loads(done.read_text()))
        return {"metrics": metrics, "seconds": seconds}
