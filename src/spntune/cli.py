"""``spntune`` command line: parses arguments and calls one function per command.

Entry point: ``main(argv=None)``; nothing happens at import. Each command imports the modules it
needs when it runs (torch, smp, Ray and MLflow take seconds to import): ``spntune --help`` and the
refusal of bad input must answer at once. Errors a user can act on (``errors.SpntuneError``) print
their message and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spntune.allocator import reuse_freed_memory
from spntune.errors import SpntuneError

__all__ = ["build_parser", "main"]


def cmd_train(args: argparse.Namespace) -> int:
    from spntune.config import TrialConfig, check_data_root, layer_config
    from spntune.tracking import default_tracking_uri

    raw = layer_config(args.config, args.set or [], args.smoke_test)
    if args.output:
        raw["output_dir"] = args.output
    raw.setdefault("output_dir", str(Path("runs") / "train"))
    if args.mlflow or args.tracking_uri:
        raw.setdefault("tracking", {})["uri"] = args.tracking_uri or default_tracking_uri()
    cfg = TrialConfig.from_dict(raw)  # refuse bad input before importing torch
    check_data_root(cfg.data)
    reuse_freed_memory()
    from spntune.console import ConsoleReporter, make_console, print_results, print_written
    from spntune.trainables import train_segmentation

    console = make_console()
    reporter = ConsoleReporter(console, cfg.total_epochs)
    reporter.announce(cfg)
    result = train_segmentation(cfg.to_dict(), reporter, resume_from=args.resume)
    print_results(console, result["metrics"], result["class_names"])
    print_written([f"wrote {cfg.output_dir}/config.yaml, checkpoint.pt and panels/"], console)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from spntune.config import SEARCH_SMOKE_OVERRIDES, parse_set_args
    from spntune.search_options import SearchOptions, check_search, read_settings, resumed
    from spntune.space import builtin_space_path, load_space

    space_arg = "smoke" if args.space is None else args.space  # --space '' is refused, not the smoke space
    space = load_space(space_arg)
    sets = parse_set_args(args.set or [])
    # The options set on this command line (None: not given). A new search takes SearchOptions' defaults for
    # the others; --resume takes the settings the search started with (search_options.resumed).
    flags = {
        "trials": args.trials, "concurrency": args.concurrency, "gpus_per_trial": args.gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial, "scheduler": args.scheduler, "grace_period": args.grace_period,
        "reduction_factor": args.reduction_factor, "metric": args.metric,
        "objectives": None if args.objective is None else [o.strip() for o in args.objective.split(",") if o.strip()],
        "max_failures": args.max_failures, "seed": args.seed, "experiment": args.experiment,
        "overrides": {**(SEARCH_SMOKE_OVERRIDES if args.smoke_test else {}), **sets} or None,
        "tracking_uri": "none" if args.no_mlflow else args.tracking_uri, "viz": False if args.no_viz else None,
    }  # fmt: skip
    given = {key: value for key, value in flags.items() if value is not None}
    opts = SearchOptions(
        space=space,
        **{"trials": 2 if args.smoke_test else 8, **given},
        address=args.address,
        name=args.name or space.name,
        storage=Path(args.storage),
        resume=args.resume,
        retry_errored=args.retry_errored,
        top=args.top,
        space_file=Path(space_arg) if Path(space_arg).is_file() else builtin_space_path(space_arg),
    )
    opts = resumed(opts, given.keys() | ({"space"} if args.space else set()))
    check_search(opts)  # refuse bad input before importing torch, Ray and MLflow
    from spntune.console import LiveTable, print_resume, print_search_summary
    from spntune.tune import run_search

    stored = read_settings(opts.experiment_path) if opts.resume else None
    if stored is not None:
        print_resume(opts.experiment_path, opts.space.name, stored["trials"], opts.trials)

    with LiveTable(opts.metric or opts.space.metric) as table:
        summary = run_search(opts, table)
    print_search_summary(summary, opts.top)
    return 130 if summary.interrupted else 0  # 128 + SIGINT, as a shell reports Ctrl-C


def cmd_ui(args: argparse.Namespace) -> int:
    from spntune.console import print_ui_banner, print_ui_stopped
    from spntune.tracking import check_ui, default_tracking_uri, serve_ui

    uri = args.tracking_uri or default_tracking_uri()
    check_ui(uri, args.host, args.port)  # refuse before the banner: a bad port, host or store
    print_ui_banner(uri, args.host, args.port)
    code = serve_ui(uri, args.port, args.host)
    if code:
        print_ui_stopped(code)
    return code


def cmd_best(args: argparse.Namespace) -> int:
    from spntune.errors import ConfigError

    if args.top < 1:  # as `spntune search` refuses it
        raise ConfigError(f"--top must be an integer >= 1, got {args.top}")
    from spntune.console import print_best
    from spntune.tracking import default_tracking_uri, search_rows

    search, rows = search_rows(args.tracking_uri or default_tracking_uri(), args.experiment, args.search)
    print_best(search, rows, args.top)
    return 0


def _check_store_of_run(args: argparse.Namespace) -> Path | None:
    """``--run``: the MLflow store it is read from exists, and where it is a SQLite store with the artifacts on
    this machine, the run and its checkpoint too: that checkpoint's path (else None). Refused before torch and
    MLflow are imported; nothing is written."""
    from spntune.tracking import check_store, default_tracking_uri, local_checkpoint

    uri = args.tracking_uri or default_tracking_uri()
    check_store(uri)
    return local_checkpoint(uri, args.run)


def cmd_predict(args: argparse.Namespace) -> int:
    reuse_freed_memory()
    from spntune.predict_input import check_checkpoint_path, check_predict_inputs

    # refuse bad input (every image is decoded) before importing torch and loading the model
    if args.checkpoint:
        check_checkpoint_path(args.checkpoint)
    else:
        _check_store_of_run(args)
    images = check_predict_inputs(args.images, args.out)
    from spntune.console import print_written
    from spntune.predict import load_pipeline, predict_images
    from spntune.tracking import default_tracking_uri

    pipeline = load_pipeline(args.checkpoint, args.run, args.tracking_uri or default_tracking_uri())
    written = predict_images(pipeline, images, Path(args.out), checked=True)
    print_written([f"{image} -> {mask}, {overlay.name}" for image, mask, overlay in written])
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from spntune.config import parse_set_args
    from spntune.predict_input import (
        check_checkpoint_path,
        check_data_sets,
        check_evaluate_split,
        check_json_path,
        checkpoint_config,
    )

    # refuse bad input before importing torch and loading the model
    sets = parse_set_args(args.set or [])
    check_data_sets(sets)
    if args.json:
        check_json_path(args.json)
    reuse_freed_memory()
    if args.checkpoint:
        path = check_checkpoint_path(args.checkpoint)
        if args.split:  # against the dataset of the checkpoint's own config, read without torch
            check_evaluate_split(args.split, sets, checkpoint_config(path))
    else:
        local = _check_store_of_run(args)
        if args.split:  # against the run's checkpoint where it lies on this machine, else --set's dataset alone
            check_evaluate_split(args.split, sets, checkpoint_config(local) if local is not None else None)
    from spntune.config import TrialConfig, flatten
    from spntune.console import make_console, print_results, print_written
    from spntune.predict import evaluate_split, load_pipeline, write_json
    from spntune.tracking import default_tracking_uri

    pipeline = load_pipeline(args.checkpoint, args.run, args.tracking_uri or default_tracking_uri())
    data = TrialConfig.from_dict({**flatten(pipeline.cfg.to_dict()), **sets}).data
    metrics = evaluate_split(pipeline, data, args.split)
    class_names, split = metrics.pop("class_names"), metrics.pop("split")
    print_results(make_console(), metrics, class_names,
                  title=f"{data.name} {split}: {metrics['images']} images at their original size")  # fmt: skip
    if args.json:
        write_json(Path(args.json), {"split": split, "class_names": class_names, **metrics})
        print_written([f"wrote {args.json}"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spntune", description="Search refined segmentation pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run one trial in-process (debug mode, no Ray)")
    train.add_argument("--config", help="trial config YAML")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. refiner.kind=dyspn")
    train.add_argument("--smoke-test", action="store_true", help="shrink to seconds (tiny images, 1 epoch)")
    train.add_argument("--output", help="output folder (default: output_dir from the config, else runs/train)")
    train.add_argument("--resume", help="checkpoint file/folder to continue from")
    train.add_argument("--mlflow", action="store_true", help="also log this trial as an MLflow run (./mlflow_runs)")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (implies --mlflow)")
    train.set_defaults(func=cmd_train)

    search = sub.add_parser("search", help="hyperparameter search with Ray Tune + Optuna")
    search.add_argument("--space", help="search space YAML, or a built-in: smoke, pets, voc, camvid (default smoke)")
    search.add_argument("--trials", type=int, help="number of trials (default 8; 2 with --smoke-test)")
    search.add_argument("--concurrency", type=int, help="trials running at once (default 2)")
    search.add_argument("--gpus-per-trial", type=float, help="fraction of a GPU per trial, e.g. 0.5 (default 0)")
    search.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1)")
    search.add_argument("--scheduler", choices=["asha", "none"], help="ASHA early stopping on epochs (default asha)")
    search.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped (default 1)")
    search.add_argument("--reduction-factor", type=float, help="ASHA: keep 1/factor at each rung (default 2)")
    search.add_argument("--metric", help="metric to optimise (default: the space's, refined_miou)")
    search.add_argument("--objective", help="miou (default), or miou,latency for a Pareto search")
    search.add_argument("--address", help="Ray cluster address (auto or HOST:PORT); default: start Ray here")
    search.add_argument("--name", help="search name (default: the space's name)")
    search.add_argument("--storage", default="runs/ray", help="folder for Ray results and checkpoints")
    search.add_argument(
        "--resume",
        action="store_true",
        help="continue the search of this name with its own settings; a larger --trials adds trials to it",
    )
    search.add_argument(
        "--retry-errored",
        action="store_true",
        help="with --resume: errored trials run again from their last checkpoint (default: they stay errored)",
    )
    search.add_argument("--max-failures", type=int, help="retries of a crashed trial from its checkpoint (default 1)")
    search.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a trial key for every trial")
    search.add_argument("--seed", type=int, help="TPE sampler seed (default 0)")
    search.add_argument("--top", type=int, default=10, help="leaderboard rows to print")
    search.add_argument(
        "--smoke-test",
        action="store_true",
        help="2 tiny trials of seconds each, without pictures (--space smoke alone logs them, as make demo does)",
    )
    search.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow_runs)")
    search.add_argument("--experiment", help="MLflow experiment name (default spntune)")
    search.add_argument("--no-mlflow", action="store_true", help="do not track in MLflow")
    search.add_argument(
        "--no-viz", action="store_true", help="skip mask panels and Grad-CAM artifacts (large searches)"
    )
    search.set_defaults(func=cmd_search)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000, help="port to listen on, 1-65535 (default 5000)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlflow_runs")
    ui.set_defaults(func=cmd_ui)

    best = sub.add_parser("best", help="leaderboard of a search, read from MLflow")
    best.add_argument("--search", help="search name (default: the latest search)")
    best.add_argument("--top", type=int, default=10, help="leaderboard rows to print (default 10)")
    best.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlflow_runs")
    best.add_argument("--experiment", default="spntune")
    best.set_defaults(func=cmd_best)

    predict = sub.add_parser("predict", help="write masks and overlays with a trained model")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="MLflow run id of a trial (its best checkpoint)")
    source.add_argument("--checkpoint", help="a checkpoint.pt (or its folder) from spntune train")
    predict.add_argument("images", nargs="+", help="image files (a mask and an overlay each, named by file stem)")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlflow_runs")
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="score a trained pipeline on a split at each image's original size")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="MLflow run id of a trial (its best checkpoint)")
    source.add_argument("--checkpoint", help="a checkpoint.pt (or its folder) from spntune train")
    evaluate.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a data key (data.* only), e.g. data.root"
    )
    evaluate.add_argument("--split", help="split to score (default: the dataset's validation split)")
    evaluate.add_argument("--json", help="also write the numbers to this JSON file (its folder must exist)")
    evaluate.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlflow_runs")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (SpntuneError, FileNotFoundError) as exc:
        print(f"spntune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
