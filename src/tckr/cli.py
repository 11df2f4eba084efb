"""``tckr`` command line: run a recipe's pipeline locally or on a cluster, run one stage, show the resolved
config, compile pipelines, start local servers. Every user-fixable failure is a :class:`TckrError`: one line,
non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tckr.components import REPOSITORY
from tckr.core.errors import ConfigError, TckrError
from tckr.core.progress import close_bars
from tckr.recipes.config import available_profiles, load_config


def _config_arguments(parser: argparse.ArgumentParser, default: str | None = "demo") -> None:
    parser.add_argument("--profile", default=default,
                        help=f"one of {', '.join(available_profiles())}, or a .yaml path (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set teacher.epochs=3 (repeatable)")


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="image of the CPU tasks, e.g. a tag `make images` printed "
                        "(default: kubernetes.image, else this code's own, tagged by content)")
    parser.add_argument("--cuda-image", help="image of the GPU tasks (default: kubernetes.cuda_image, else this "
                        "code's own CUDA image)")


def _image_overrides(args: argparse.Namespace) -> list[str]:
    """--image / --cuda-image as the config overrides they are."""
    return [f"kubernetes.{key}={value}" for key, value in (("image", args.image), ("cuda_image", args.cuda_image))
            if value]


def _cmd_run(args: argparse.Namespace) -> int:
    from tckr.pipelines.compile import local_pipeline
    from tckr.platform.runner import latest_unfinished, resumable, resume_local, run_local

    if args.resume is None:
        cfg = load_config(args.profile or "demo", args.overrides)
        outcome = run_local(cfg, local_pipeline(cfg), Path(args.runs_dir))
    else:
        if args.overrides or args.profile:
            raise ConfigError("--resume finishes a run with the configuration it started with: "
                              "drop --profile and --set")
        run_dir = Path(args.resume).resolve() if args.resume else latest_unfinished(Path(args.runs_dir))
        print(f"resuming {run_dir} ({resumable(run_dir)['state']})", file=sys.stderr, flush=True)
        cfg = load_config(str(run_dir / "config.yaml"))
        outcome = resume_local(run_dir, cfg, local_pipeline(cfg))
    if cfg.recipe == "privimage":
        _print_privimage(outcome.metrics, outcome.run_dir)
    else:
        from tckr.recipes.report import attack_table, chance_verdict
        from tckr.recipes.tckr.report import TARGETS, render_privacy_table, render_table, results_table

        print("\n" + render_table(results_table(outcome.metrics)))
        print("\nteacher vs student, in % with 95% intervals (TCKR Table 2 layout):\n"
              + render_privacy_table(outcome.metrics))
        print("\nboth attacks, in % with 95% intervals:\n" + attack_table(outcome.metrics, TARGETS))
        print(chance_verdict(outcome.metrics, TARGETS))
        _print_audit(outcome.metrics)
        print(f"\nreport:        {outcome.run_dir / 'report.md'}  (metrics.json, config.yaml, roc.png, samples.png, "
              "worst-pairs.png)")
    if outcome.tracking_uri.startswith("sqlite:///"):
        print(f"MLflow UI:     mlflow ui --backend-store-uri {outcome.tracking_uri}   (or: make mlflow-ui)")
    else:
        print(f"MLflow:        {outcome.tracking_uri}")
    return 0


def _print_audit(metrics: dict[str, float]) -> None:
    from tckr.recipes.report import audit_table, audit_verdict

    table = audit_table(metrics)
    if table:
        print("\ndoes the synthetic set copy members? (distance to closest record):\n" + table)
        print(audit_verdict(metrics))


def _print_privimage(metrics: dict[str, float], run_dir: Path) -> None:
    """The run's headline figures and, when a finished TCKR run of the same dataset sits beside it, both
    recipes side by side (also written to ``comparison.md`` in the run directory)."""
    from tckr.recipes.privimage.report import HEADLINE_COLUMNS, STAGE_ROWS, TARGETS, headline
    from tckr.recipes.report import (
        attack_table,
        chance_verdict,
        comparison_report,
        latest_run_of,
        render_table,
        stage_rows,
    )

    print("\n" + render_table(stage_rows(metrics, STAGE_ROWS)))
    print("\nPrivImage, end to end:\n" + render_table(headline(metrics), HEADLINE_COLUMNS))
    print("\nboth attacks, in % with 95% intervals:\n" + attack_table(metrics, TARGETS))
    print(chance_verdict(metrics, TARGETS))
    _print_audit(metrics)
    print(f"\nreport:        {run_dir / 'report.md'}  (metrics.json, config.yaml, selection.json, roc.png, "
          "samples.png, worst-pairs.png)")
    tckr_run = latest_run_of("tckr", run_dir)
    if tckr_run is not None:
        comparison = comparison_report([tckr_run, run_dir])
        (run_dir / "comparison.md").write_text(comparison)
        print(f"\n{comparison}\nside by side: {run_dir / 'comparison.md'}")


def _cmd_report(args: argparse.Namespace) -> int:
    from tckr.recipes.report import comparison_report

    report = comparison_report([Path(path) for path in args.run_dirs])
    if args.out:
        Path(args.out).write_text(report)
    print(report)
    return 0


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cmd_stage(args: argparse.Namespace, rest: list[str]) -> int:
    """One declared stage outside KFP (DVC's entry point): its artifacts as options named after its ports, its
    own MLflow run, its metrics as JSON in ``--metrics`` (default: ``metrics.json`` in its first output)."""
    import json

    from tckr.core.atomic import write_text
    from tckr.core.environment import scoped
    from tckr.core.volume import task_key
    from tckr.platform.tracking import TASK_KEY_ENV, Tracking, default_tracking_uri
    from tckr.recipes.invoke import invoke, recipe_stage, sections_of

    cfg = load_config(args.profile, args.overrides)
    _, stage = recipe_stage(cfg.recipe, args.name)
    parser = argparse.ArgumentParser(prog=f"tckr stage {stage.name}", description=stage.summary)
    for name, port in stage.inputs.items():
        what = "JSON file of the stage's metrics" if port.kind == "metrics" else f"{port.kind} directory"
        parser.add_argument(_option(name), dest=name, nargs="*" if port.many else None,
                            default=[] if port.many else None, help=f"input: {what}")
    for name, port in stage.outputs.items():
        parser.add_argument(_option(name), dest=name,
                            help=f"output: {port.kind} {'file' if port.is_file else 'directory'}")
    for name, kind in stage.params.items():
        parser.add_argument(_option(name), dest=name, type=kind)
    given = vars(parser.parse_args(rest))
    missing = [_option(name) for name, value in given.items() if value is None]
    if missing:
        raise ConfigError(f"tckr stage {stage.name} needs {' '.join(missing)} (its inputs are earlier stages' "
                          "outputs; `tckr stage NAME --help` lists them)")
    artifacts = {name: (json.loads(Path(given[name]).read_text()) if port.kind == "metrics"
                        else [Path(p) for p in given[name]] if port.many else Path(given[name]))
                 for name, port in stage.inputs.items()}
    artifacts |= {name: Path(given[name]) for name in stage.outputs}
    tracking = Tracking(default_tracking_uri(), cfg.experiment_name)
    # Its paths and the configuration name the task: a killed stage run again continues its MLflow run.
    task = task_key(cfg.recipe, stage.name, {"config": cfg.fingerprint()} | {k: str(v) for k, v in given.items()})
    with scoped({TASK_KEY_ENV: task}):
        result = invoke(stage, sections_of(cfg, stage), artifacts, {name: given[name] for name in stage.params},
                        tracking)
    if stage.returns == "metrics":
        first_output = next(iter(stage.outputs), None)
        default_dir = Path(given[first_output]) if first_output else Path(".")
        metrics_path = Path(args.metrics) if args.metrics else default_dir / "metrics.json"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(metrics_path, json.dumps(dict(sorted(result.items())), indent=2) + "\n")
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile, args.overrides)
    print(cfg.to_yaml(), end="")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    """Without --profile: the committed pipelines beside their sources."""
    from tckr.pipelines.compile import compile_committed, compile_pipeline

    overrides = args.overrides + _image_overrides(args)
    if args.profile is None and overrides:
        raise ConfigError("--set, --image and --cuda-image need --profile (without one, tckr compile writes the "
                          "committed pipelines)")
    if args.profile is None:
        written = compile_committed(Path(args.out_dir) if args.out_dir else None)
    else:
        cfg = load_config(args.profile, overrides)
        out_dir = Path(args.out_dir or f"compiled/{Path(args.profile).stem}")
        written = [compile_pipeline(cfg, out_dir)]
    for path in written:
        print(f"compiled {path}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from tckr.pipelines.build import pipeline_arguments
    from tckr.pipelines.cluster import images_of
    from tckr.pipelines.compile import GRAPHS, compile_pipeline
    from tckr.platform.runner import new_run_name
    from tckr.platform.submit import follow, submit, ui_links

    cfg = load_config(args.profile, args.overrides + _image_overrides(args))
    run_name = new_run_name(cfg)
    tracking_uri = args.tracking_uri or cfg.kubernetes.tracking_uri
    submitted = submit(args.host, lambda folder: compile_pipeline(cfg, folder, cache=not args.no_cache),
                       pipeline_arguments(cfg, run_name, tracking_uri), run_name,
                       args.experiment or cfg.experiment_name, pipeline_name=cfg.recipe, profile=cfg.profile,
                       description=GRAPHS[cfg.recipe][1], namespace=args.namespace,
                       version_description=f"profile {cfg.profile}; images {', '.join(images_of(cfg.kubernetes))}")
    links = ui_links(args.host, submitted)
    print(f"pipeline:      {cfg.recipe}, version {submitted.version_name}: {links['pipeline']}")
    print(f"submitted {run_name}: {links['run']}")
    if not args.wait:
        return 0
    state = follow(submitted.client, submitted.run_id)
    return 0 if state == "SUCCEEDED" else 1


def _cmd_rehearse(args: argparse.Namespace) -> int:
    """What `tckr submit` would send, executed from its compiled YAML against a stand-in cluster."""
    from tckr.pipelines.build import pipeline_arguments
    from tckr.pipelines.compile import compile_pipeline
    from tckr.platform.rehearse import rehearse_package
    from tckr.platform.runner import new_run_name

    cfg = load_config(args.profile, args.overrides)
    run_name = new_run_name(cfg)
    workdir = Path(args.runs_dir).resolve() / f"{run_name}-rehearsal"
    package = compile_pipeline(cfg, workdir)
    outcome = rehearse_package(package, pipeline_arguments(cfg, run_name, cfg.kubernetes.tracking_uri),
                               cfg.kubernetes, workdir, Path(args.mlflow_deployment))
    print(f"rehearsed {package}: {len(outcome.tasks)} pods in {outcome.seconds:.0f} s, MLflow parent run "
          f"{outcome.parent_run_status}; pods' logs in {workdir / 'logs'}")
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    """The tags this code's images get (``make images`` builds them under these)."""
    from tckr.components import default_images

    images = default_images(repository=args.repository)
    print(*(getattr(images, target) for target in args.target), sep="\n")
    return 0


def _cmd_services(args: argparse.Namespace) -> int:
    from tckr.platform import services
    from tckr.platform.tracking import LOCAL_ARTIFACTS, LOCAL_DB

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
        os.execve(command[0], command, {**os.environ, **services.mlflow_environment(store)})
    elif args.action == "down":
        names = ["mlflow", "seaweedfs"] if args.service == "s3" else ["mlflow"]  # MLflow keeps artifacts in S3
        for name in names:
            print(f"{name}: {'stopped' if services.down(state, name) else 'was not running'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tckr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the profile's recipe pipeline locally (kfp.local, no cluster)")
    _config_arguments(run)
    run.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    run.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                     help="finish a killed, interrupted or failed run where it stopped, with its own configuration "
                     "(default: the newest unfinished run under --runs-dir)")
    run.set_defaults(handler=_cmd_run, profile=None)  # None: not given (--resume refuses one), else demo

    stage = commands.add_parser("stage", help="run one declared stage on its own (used by dvc.yaml)", add_help=False,
                                description="tckr stage NAME --profile P [--set K=V] [--metrics FILE] then the stage's "
                                "own options (its input and output artifacts, named after them: tckr stage NAME -h)")
    stage.add_argument("name", help="the stage, e.g. ingest, teacher, caption, ..., register")
    _config_arguments(stage)
    stage.add_argument("--metrics", help="where to write the stage's metrics (default: OUTPUT/metrics.json)")
    stage.set_defaults(handler=_cmd_stage)

    show = commands.add_parser("config", help="print the resolved configuration")
    _config_arguments(show)
    show.set_defaults(handler=_cmd_config)

    compile_ = commands.add_parser("compile", help="compile the pipelines to YAML")
    _config_arguments(compile_, default=None)
    compile_.add_argument("--out-dir", help="default: beside the sources, or compiled/<profile> with --profile")
    _image_arguments(compile_)
    compile_.set_defaults(handler=_cmd_compile)

    submit_ = commands.add_parser("submit", help="run the pipeline on a Kubeflow Pipelines server")
    _config_arguments(submit_)
    submit_.add_argument("--host", required=True, help="the KFP API, e.g. http://127.0.0.1:8080")
    submit_.add_argument("--experiment", help="KFP experiment (default: the MLflow experiment's name)")
    submit_.add_argument("--no-cache", action="store_true", help="re-run every task instead of reusing cached ones")
    _image_arguments(submit_)
    submit_.add_argument("--wait", action=argparse.BooleanOptionalAction, default=False,
                         help="follow the run to its end; exit 1 unless it succeeds (default: --no-wait)")
    submit_.add_argument("--tracking-uri", help="MLflow server as the pods see it (default: kubernetes.tracking_uri)")
    submit_.add_argument("--namespace", help="KFP namespace (multi-user installs)")
    submit_.set_defaults(handler=_cmd_submit)

    rehearse = commands.add_parser("rehearse", help="run the compiled pipeline as a cluster would, without one")
    _config_arguments(rehearse)
    rehearse.add_argument("--runs-dir", default="runs", help="where the rehearsal's directory goes (default: runs)")
    rehearse.add_argument("--mlflow-deployment", default="mlflow/k8s/deployment.yaml",
                          help="the cluster's MLflow Deployment, whose server options the stand-in server takes")
    rehearse.set_defaults(handler=_cmd_rehearse)

    report = commands.add_parser("report", help="put finished runs (either recipe) side by side")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, e.g. runs/latest")
    report.add_argument("--out", help="also write the Markdown report here")
    report.set_defaults(handler=_cmd_report)

    images = commands.add_parser("images", help="print the tags of this code's images (CPU, then CUDA)")
    images.add_argument("--target", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"],
                        help="which tags, one per line (default: both)")
    images.add_argument("--repository", default=REPOSITORY, help=f"where they are pushed (default: {REPOSITORY})")
    images.set_defaults(handler=_cmd_images)

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

    args, rest = parser.parse_known_args(argv)
    try:
        if args.handler is _cmd_stage:
            return _cmd_stage(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.handler(args)
    except TckrError as error:
        close_bars()
        print(f"tckr: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
