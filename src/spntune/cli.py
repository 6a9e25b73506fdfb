"""``spntune`` command line. Entry point: ``main(argv=None)``; nothing happens at import."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

#: Overrides that shrink any trial to seconds on a CPU (applied after --config, before --set).
SMOKE_OVERRIDES: dict[str, Any] = {
    "data.image_size": [64, 64],
    "data.train_size": 16,
    "data.val_size": 8,
    "data.limit_train": 16,
    "data.limit_val": 8,
    "train.epochs": 1,
    "train.coarse_epochs": 1,
    "train.refine_epochs": 1,
    "train.batch_size": 4,
    "train.viz_samples": 2,
}


def make_console() -> Any:
    """Rich console; wide when output is piped or logged so tables keep their columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def format_metric(v: Any) -> str:
    """A metric to 4 decimals; ``-`` for missing, NaN or non-numeric values."""
    return "-" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.4f}"


def build_trial_config(config_file: str | None, sets: list[str], smoke: bool) -> dict[str, Any]:
    """Layer YAML file < smoke overrides < --set into one nested dict (not yet validated)."""
    from spntune.config import load_yaml, parse_set_args, unflatten

    layers: dict[str, Any] = dict(load_yaml(config_file)) if config_file else {}
    merged = unflatten(layers)
    if smoke:
        merged = unflatten({**_flat(merged), **SMOKE_OVERRIDES})
    return unflatten({**_flat(merged), **parse_set_args(sets)})


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    from spntune.config import flatten

    return flatten(d)


def cmd_train(args: argparse.Namespace) -> int:
    from spntune.config import TrialConfig
    from spntune.console import ConsoleReporter, print_results
    from spntune.trainables import train_segmentation

    console = make_console()
    raw = build_trial_config(args.config, args.set or [], args.smoke_test)
    if args.output:
        raw.setdefault("output_dir", args.output)
    if args.mlflow or args.tracking_uri:
        from spntune.tracking import default_tracking_uri

        raw.setdefault("tracking", {})["uri"] = args.tracking_uri or default_tracking_uri()
    raw.setdefault("output_dir", str(Path("runs") / "train"))
    cfg = TrialConfig.from_dict(raw)  # validate before any heavy work
    console.print(
        f"[bold]spntune train[/bold]: {cfg.data.name} {cfg.data.image_size[0]}x{cfg.data.image_size[1]}, "
        f"{cfg.model.arch}/{cfg.model.encoder} + {cfg.refiner.kind}, {cfg.train.stage}, "
        f"{cfg.total_epochs} epochs -> {cfg.output_dir}"
    )
    reporter = ConsoleReporter(console, cfg.total_epochs)
    try:
        result = train_segmentation(cfg.to_dict(), reporter, resume_from=args.resume)
    finally:
        reporter.close()
    print_results(console, result["metrics"], result["class_names"])
    console.print(f"wrote {cfg.output_dir}/config.yaml, checkpoint.pt and panels/")
    return 0


#: Overrides for `search --smoke-test`: every trial shrinks to seconds (any space, any data).
SEARCH_SMOKE_OVERRIDES: dict[str, Any] = {
    **SMOKE_OVERRIDES,
    "train.epochs": 2,  # two epochs, so ASHA has a rung to act on
    "train.viz_samples": 0,  # picture-free to stay fast; `--space smoke` without --smoke-test draws them
    "model.encoder": "resnet18",
}


def cmd_search(args: argparse.Namespace) -> int:
    from spntune.config import parse_set_args
    from spntune.search import SearchOptions, print_summary, run_search
    from spntune.space import builtin_space_path, load_space

    space = load_space(args.space)
    overrides = {**(SEARCH_SMOKE_OVERRIDES if args.smoke_test else {}), **parse_set_args(args.set or [])}
    opts = SearchOptions(
        space=space,
        trials=2 if args.smoke_test and args.trials is None else (args.trials or 8),
        concurrency=args.concurrency,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        metric=args.metric,
        objectives=[o.strip() for o in args.objective.split(",") if o.strip()],
        address=args.address,
        name=args.name or space.name,
        storage=Path(args.storage),
        resume=args.resume,
        max_failures=args.max_failures,
        overrides=overrides,
        seed=args.seed,
        top=args.top,
        tracking_uri="none" if args.no_mlflow else args.tracking_uri,
        experiment=args.experiment,
        viz=not args.no_viz,
        space_file=Path(args.space) if Path(args.space).is_file() else builtin_space_path(args.space),
    )
    summary = run_search(opts)
    print_summary(summary, opts.top)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from spntune.tracking import _artifact_root, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
    ]
    root = _artifact_root(uri)
    if root:
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        cmd += ["--default-artifact-root", root]
    print(
        f"MLflow UI: http://127.0.0.1:{args.port}/#/experiments?workflowType=machine_learning  (tracking {uri}); Ctrl-C stops it",
        flush=True,
    )
    try:
        return subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
        return 0


def cmd_best(args: argparse.Namespace) -> int:
    from rich.table import Table

    from spntune.config import describe_pipeline
    from spntune.tracking import TAG_PARENT, TAG_SEARCH, _client, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    client = _client(uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise FileNotFoundError(f"no MLflow experiment {args.experiment!r} at {uri}")
    searches = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000)
                if TAG_SEARCH in r.data.tags and TAG_PARENT not in r.data.tags]  # fmt: skip
    if args.search:
        searches = [r for r in searches if r.data.tags[TAG_SEARCH] == args.search]
    if not searches:
        raise FileNotFoundError(
            f"no search {args.search or ''} in experiment {args.experiment!r} at {uri}".replace("  ", " ")
        )
    parent = searches[0]
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'", max_results=5000
    )
    children.sort(key=lambda r: -r.data.metrics.get("best_refined_miou", -1.0))
    console = make_console()
    table = Table(
        title=f"search {parent.data.tags[TAG_SEARCH]} (run {parent.info.run_id}): best refined mIoU per trial"
    )
    for col in (
        "#",
        "run id",
        "trial",
        "pipeline",
        "epochs",
        "best refined mIoU",
        "coarse mIoU",
        "boundary IoU",
        "status",
    ):
        table.add_column(col)
    for i, run in enumerate(children[: args.top], 1):
        p, m = run.data.params, run.data.metrics
        table.add_row(
            str(i), run.info.run_id, run.data.tags.get("spntune.ray_trial_id", ""), describe_pipeline(p),
            str(len({h.step for h in client.get_metric_history(run.info.run_id, "refined_miou")})),  # a retried epoch once
            format_metric(m.get("best_refined_miou", math.nan)), format_metric(m.get("coarse_miou", math.nan)),
            format_metric(m.get("refined_boundary_iou", math.nan)), run.info.status,
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(children)} trial runs; best: {parent.data.tags.get('best_trial_run_id', '-')}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from spntune.config import TrialConfig
    from spntune.data.base import read_image, to_tensors
    from spntune.data.transforms import build_transform
    from spntune.trainables import build_model, load_checkpoint
    from spntune.viz import _PALETTE, colourise

    with tempfile.TemporaryDirectory(prefix="spntune-predict-") as tmp:
        if args.run:
            from spntune.tracking import _client, default_tracking_uri

            client = _client(args.tracking_uri or default_tracking_uri())
            try:
                path = client.download_artifacts(args.run, "checkpoint/checkpoint.pt", tmp)
            except Exception as exc:
                raise FileNotFoundError(f"run {args.run} has no checkpoint/checkpoint.pt artifact: {exc}") from None
        else:
            path = args.checkpoint
        state = load_checkpoint(path)
    cfg = TrialConfig.from_dict(state["config"])
    class_names = state["extra"]["class_names"]
    model = build_model(cfg, len(class_names))
    model.load_state_dict(state["model"])
    model.eval()
    transform = build_transform(cfg.data.image_size, train=False)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = _PALETTE.flatten().tolist()
    for image_path in map(Path, args.images):
        image = read_image(image_path)
        x, _ = to_tensors(image, np.zeros(image.shape[:2], np.uint8), transform)
        with torch.no_grad():
            pred = model(x.unsqueeze(0)).refined_logits.argmax(1)[0].numpy().astype(np.uint8)
        mask = Image.fromarray(pred, mode="P").resize((image.shape[1], image.shape[0]), Image.NEAREST)
        mask.putpalette(palette)
        mask.save(out_dir / f"{image_path.stem}_mask.png")
        overlay = (0.5 * image + 0.5 * colourise(np.asarray(mask))).astype(np.uint8)
        Image.fromarray(overlay).save(out_dir / f"{image_path.stem}_overlay.png")
        print(f"{image_path} -> {out_dir / (image_path.stem + '_mask.png')}, {image_path.stem}_overlay.png")
    (out_dir / "classes.txt").write_text("\n".join(class_names) + "\n")
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
    search.add_argument("--space", default="smoke", help="search space YAML, or a built-in: smoke, pets, voc, camvid")
    search.add_argument("--trials", type=int, help="number of trials (default 8; 2 with --smoke-test)")
    search.add_argument("--concurrency", type=int, default=2, help="trials running at once")
    search.add_argument("--gpus-per-trial", type=float, default=0.0, help="fraction of a GPU per trial, e.g. 0.5")
    search.add_argument("--cpus-per-trial", type=float, default=1.0)
    search.add_argument("--scheduler", choices=["asha", "none"], default="asha", help="ASHA early stopping on epochs")
    search.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    search.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/factor at each rung")
    search.add_argument("--metric", help="metric to optimise (default: the space's, refined_miou)")
    search.add_argument("--objective", default="miou", help="miou, or miou,latency for a Pareto search")
    search.add_argument("--address", help="Ray cluster address (auto or HOST:PORT); default: start Ray here")
    search.add_argument("--name", help="search name (default: the space's name)")
    search.add_argument("--storage", default="runs/ray", help="folder for Ray results and checkpoints")
    search.add_argument("--resume", action="store_true", help="continue an interrupted search of this name")
    search.add_argument("--max-failures", type=int, default=1, help="retries of a crashed trial from its checkpoint")
    search.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a trial key for every trial")
    search.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    search.add_argument("--top", type=int, default=10, help="leaderboard rows to print")
    search.add_argument(
        "--smoke-test",
        action="store_true",
        help="2 tiny trials of seconds each, without pictures (--space smoke alone logs them, as make demo does)",
    )
    search.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow_runs)")
    search.add_argument("--experiment", default="spntune", help="MLflow experiment name")
    search.add_argument("--no-mlflow", action="store_true", help="do not track in MLflow")
    search.add_argument(
        "--no-viz", action="store_true", help="skip mask panels and Grad-CAM artifacts (large searches)"
    )
    search.set_defaults(func=cmd_search)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlflow_runs")
    ui.set_defaults(func=cmd_ui)

    best = sub.add_parser("best", help="leaderboard of a search, read from MLflow")
    best.add_argument("--search", help="search name (default: the latest search)")
    best.add_argument("--top", type=int, default=10)
    best.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlflow_runs")
    best.add_argument("--experiment", default="spntune")
    best.set_defaults(func=cmd_best)

    predict = sub.add_parser("predict", help="write masks and overlays with a trained model")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="MLflow run id of a trial (its best checkpoint)")
    source.add_argument("--checkpoint", help="a checkpoint.pt (or its folder) from spntune train")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlflow_runs")
    predict.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    from spntune.config import ConfigError
    from spntune.data.base import DatasetError
    from spntune.models.coarse import WeightsUnavailableError
    from spntune.trainables import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, DatasetError, WeightsUnavailableError, NonFiniteLossError, FileNotFoundError) as exc:
        print(f"spntune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
