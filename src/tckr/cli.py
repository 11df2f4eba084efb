"""``tckr`` command line: run the pipeline locally or on a cluster, show the resolved config, compile pipelines."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tckr.config import ConfigError, available_profiles, load_config


def _config_arguments(parser: argparse.ArgumentParser, default: str | None = "demo") -> None:
    parser.add_argument("--profile", default=default,
                        help=f"one of {', '.join(available_profiles())}, or a .yaml path (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set teacher.epochs=3 (repeatable)")


def _cmd_run(args: argparse.Namespace) -> int:
    from tckr.report import render_privacy_table, render_table, results_table
    from tckr.runner import run_local

    cfg = load_config(args.profile, args.overrides)
    outcome = run_local(cfg, Path(args.runs_dir))
    print("\n" + render_table(results_table(outcome.metrics)))
    print("\nteacher vs student, in % (TCKR Table 2 layout):\n" + render_privacy_table(outcome.metrics))
    print(f"\nreport:        {outcome.run_dir / 'report.md'}  (metrics.json, config.yaml, roc.png, samples.png)")
    if outcome.tracking_uri.startswith("sqlite:///"):
        print(f"MLflow UI:     mlflow ui --backend-store-uri {outcome.tracking_uri}   (or: make mlflow-ui)")
    else:
        print(f"MLflow:        {outcome.tracking_uri}")
    return 0


# What each stage reads, as `tckr stage` options (the outputs of earlier stages).
STAGE_INPUTS = {"ingest": (), "teacher": ("data",), "caption": ("data",), "generator": ("data", "captions"),
                "finetune": ("data", "captions", "generator"),
                "generate": ("data", "captions", "generator", "adapter", "teacher"),
                "student": ("data", "synthetic", "teacher"), "attack": ("data", "teacher", "student"),
                "register": ("teacher", "student")}


def _cmd_stage(args: argparse.Namespace) -> int:
    """One stage outside KFP (DVC's entry point): its own MLflow run; its metrics as JSON in ``--metrics``
    (default: ``metrics.json`` in ``--out``)."""
    import json

    from tckr import stages
    from tckr.tracking import default_tracking_uri

    cfg = load_config(args.profile, args.overrides)
    missing = [f"--{name}" for name in STAGE_INPUTS[args.name] if not getattr(args, name)]
    if args.name == "register" and not args.stage_metrics:
        missing.append("--stage-metrics")
    if args.name != "register" and not args.out:
        missing.append("--out")
    if missing:
        raise ConfigError(f"tckr stage {args.name} needs {' '.join(missing)} (earlier stages' outputs)")
    out, uri = Path(args.out or "."), default_tracking_uri()
    inputs = {name: Path(getattr(args, name)) for name in STAGE_INPUTS[args.name]}
    runners = {
        "ingest": lambda: stages.ingest_stage(cfg, cfg.ingest.seed, out, uri),
        "teacher": lambda: stages.teacher_stage(cfg, cfg.teacher.seed, inputs["data"], out, uri),
        "caption": lambda: stages.caption_stage(cfg, inputs["data"], out, uri),
        "generator": lambda: stages.generator_stage(cfg, cfg.generator.seed, inputs["data"], inputs["captions"],
                                                    out, uri),
        "finetune": lambda: stages.finetune_stage(cfg, cfg.finetune.seed, inputs["data"], inputs["captions"],
                                                  inputs["generator"], out, uri),
        "generate": lambda: stages.generate_stage(cfg, cfg.generate.seed, inputs["data"], inputs["captions"],
                                                  inputs["generator"], inputs["adapter"], inputs["teacher"], out, uri),
        "student": lambda: stages.student_stage(cfg, cfg.student_recipe.seed, inputs["data"], inputs["synthetic"],
                                                inputs["teacher"], out, uri),
        "attack": lambda: stages.attack_stage(cfg, cfg.attack.seed, inputs["data"], inputs["teacher"],
                                              inputs["student"], out, uri),
        "register": lambda: stages.register_stage(
            cfg, {"teacher": inputs["teacher"], "student": inputs["student"]},
            [json.loads(Path(path).read_text()) for path in args.stage_metrics], uri),
    }
    metrics = runners[args.name]()
    metrics_path = Path(args.metrics) if args.metrics else out / "metrics.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile, args.overrides)
    print(cfg.to_yaml(), end="")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    """Without --profile: the default kubernetes section, beside the sources (the committed YAML)."""
    from tckr.pipelines.compile import compile_all

    if args.profile is None and args.overrides:
        raise ConfigError("--set needs --profile (without one, tckr compile uses the default kubernetes section)")
    cluster = load_config(args.profile, args.overrides).kubernetes if args.profile else None
    out_dir = args.out_dir or (f"compiled/{Path(args.profile).stem}" if args.profile else None)
    for path in compile_all(Path(out_dir) if out_dir else None, cluster):
        print(f"compiled {path}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from tckr.runner import new_run_name
    from tckr.submit import follow, submit

    cfg = load_config(args.profile, args.overrides)
    run_name = new_run_name(cfg)
    client, run_id = submit(cfg, args.host, run_name, args.experiment or cfg.experiment_name,
                            enable_caching=not args.no_cache,
                            tracking_uri=args.tracking_uri or cfg.kubernetes.tracking_uri, namespace=args.namespace)
    print(f"submitted {run_name}: {args.host.rstrip('/')}/#/runs/details/{run_id}")
    if not args.wait:
        return 0
    state = follow(client, run_id)
    return 0 if state == "SUCCEEDED" else 1


def _cmd_services(args: argparse.Namespace) -> int:
    from tckr import services
    from tckr.tracking import LOCAL_ARTIFACTS, LOCAL_DB

    state = services.StateDir(Path(args.state_dir))
    if args.action == "up":
        if args.service == "s3":
            endpoint = services.up_s3(state, args.s3_port)
            print(f"S3 (SeaweedFS): {endpoint.url}  buckets {services.MLFLOW_BUCKET}, {services.DVC_BUCKET}")
        else:
            uri = services.up_mlflow(state, args.mlflow_port, args.s3_port, args.backend_store_uri)
            print(f"MLflow: {uri}  (artifacts in s3://{services.MLFLOW_BUCKET}, log: {state.root}/mlflow/mlflow.log)")
        print(f"credentials and URLs: set -a; . {state.env_file}; set +a")
    elif args.action == "ui":  # the store `tckr run` writes without a server, in the foreground
        store = f"sqlite:///{Path(LOCAL_DB).resolve()}"
        command = services.mlflow_command(str(Path(LOCAL_ARTIFACTS).resolve()), args.mlflow_port)
        print(f"MLflow UI: http://{services.HOST}:{args.mlflow_port}  (store: {store})", flush=True)
        os.execve(command[0], command, {**os.environ, "MLFLOW_BACKEND_STORE_URI": store})
    elif args.action == "down":
        names = ["mlflow", "seaweedfs"] if args.service == "s3" else ["mlflow"]  # MLflow keeps artifacts in S3
        for name in names:
            print(f"{name}: {'stopped' if services.down(state, name) else 'was not running'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tckr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the TCKR pipeline locally (kfp.local, no cluster)")
    _config_arguments(run)
    run.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    run.set_defaults(handler=_cmd_run)

    stage = commands.add_parser("stage", help="run one stage on its own (used by dvc.yaml)")
    stage.add_argument("name", choices=list(STAGE_INPUTS))
    _config_arguments(stage)
    stage.add_argument("--out", help="the stage's output directory (every stage but register)")
    stage.add_argument("--metrics", help="where to write the stage's metrics (default: OUT/metrics.json)")
    stage.add_argument("--stage-metrics", nargs="+", metavar="JSON",
                       help="register: the teacher, student and attack stages' metrics files")
    for name, meaning in (("data", "prepared dataset (ingest)"), ("captions", "captions (caption)"),
                          ("generator", "base generator (generator)"), ("adapter", "LoRA adapter (finetune)"),
                          ("teacher", "teacher model (teacher)"), ("synthetic", "synthetic set (generate)"),
                          ("student", "student model (student)")):
        stage.add_argument(f"--{name}", help=f"directory of the {meaning}")
    stage.set_defaults(handler=_cmd_stage)

    show = commands.add_parser("config", help="print the resolved configuration")
    _config_arguments(show)
    show.set_defaults(handler=_cmd_config)

    compile_ = commands.add_parser("compile", help="compile the pipelines to YAML")
    _config_arguments(compile_, default=None)
    compile_.add_argument("--out-dir", help="default: beside the sources, or compiled/<profile> with --profile")
    compile_.set_defaults(handler=_cmd_compile)

    submit_ = commands.add_parser("submit", help="run the pipeline on a Kubeflow Pipelines server")
    _config_arguments(submit_)
    submit_.add_argument("--host", required=True, help="the KFP API, e.g. http://127.0.0.1:8080")
    submit_.add_argument("--experiment", help="KFP experiment (default: the MLflow experiment's name)")
    submit_.add_argument("--no-cache", action="store_true", help="re-run every task instead of reusing cached ones")
    submit_.add_argument("--wait", action=argparse.BooleanOptionalAction, default=False,
                         help="follow the run to its end; exit 1 unless it succeeds (default: --no-wait)")
    submit_.add_argument("--tracking-uri", help="MLflow server as the pods see it (default: kubernetes.tracking_uri)")
    submit_.add_argument("--namespace", help="KFP namespace (multi-user installs)")
    submit_.set_defaults(handler=_cmd_submit)

    services_ = commands.add_parser("services", help="start or stop the local S3 store and MLflow server")
    services_.add_argument("action", choices=["up", "down", "ui"],
                           help="ui: serve the local store (mlruns.db) in the foreground, no S3 needed")
    services_.add_argument("service", choices=["s3", "mlflow"], nargs="?", default="mlflow",
                           help="s3: SeaweedFS; mlflow: tracking server with artifacts in S3 (starts s3 too)")
    services_.add_argument("--state-dir", default=".tckr", help="data, logs, pid and env files (default: .tckr)")
    services_.add_argument("--s3-port", type=int, default=8333)
    services_.add_argument("--mlflow-port", type=int, default=5000)
    services_.add_argument("--backend-store-uri", default=os.environ.get("MLFLOW_BACKEND_STORE_URI"),
                           help="MLflow database (default: $MLFLOW_BACKEND_STORE_URI, else sqlite under "
                                "--state-dir; a postgresql:// URL works too)")
    services_.set_defaults(handler=_cmd_services)

    args = parser.parse_args(argv)
    from tckr.caption import CaptionError
    from tckr.generate import GenerationError
    from tckr.ingest import DatasetError
    from tckr.lira import AttackError
    from tckr.objectstore import ObjectStoreError
    from tckr.runner import PipelineFailed
    from tckr.services import ServiceError
    from tckr.submit import SubmitError
    from tckr.tracking import TrackingError

    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"tckr: {error}", file=sys.stderr)
        return 2
    except (DatasetError, CaptionError, GenerationError, AttackError, TrackingError, PipelineFailed,
            SubmitError, ServiceError, ObjectStoreError) as error:
        print(f"tckr: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
