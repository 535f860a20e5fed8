"""`retriever <stage>`: one subcommand per stage, each a thin shell over a library function.

Heavy libraries are imported inside the commands so `retriever --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from retriever.config import load_config
from retriever.errors import PLAIN_USER_ERRORS, DataFormatError, UserError
from retriever.registry import Registry

Command = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]
CommandTable = Registry[tuple[str, Configure, Command | None]]  # no command: a group of subcommands
COMMANDS: CommandTable = Registry("command")
DATA_COMMANDS: CommandTable = Registry("data command")


def command(name: str, help_text: str, configure: Configure, table: CommandTable = COMMANDS):
    """Register a subcommand: `configure` adds its arguments, the decorated function runs it."""

    def add(func: Command) -> Command:
        table.add(name, (help_text, configure, func))
        return func

    return add


def add_subcommands(parser: argparse.ArgumentParser, table: CommandTable, dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    for name, (help_text, configure, func) in table.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        configure(child)
        if func is not None:
            child.set_defaults(func=func)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML (e.g. configs/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4")


def _config_and_flag(flag: str, help_text: str) -> Configure:
    """The arguments of a command that reads an experiment config and takes one on/off option."""

    def configure(parser: argparse.ArgumentParser) -> None:
        _config_args(parser)
        parser.add_argument(flag, action="store_true", help=help_text)

    return configure


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (argparse then names the option in its one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


POSITIVE = _at_least(1)


def _check_backbones(names: list[str]) -> None:
    """Resolve every backbone reference before a command writes anything: a mistyped preset fails at once (presets
    cost nothing; a hub id or folder reads its config.json)."""
    from retriever.models.backbone import backbone_config

    for name in dict.fromkeys(names):
        backbone_config(name)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


# --------------------------------------------------------------------------------------------------- backbones
@command("backbones", "list the backbone presets with their parameter counts", lambda p: None)
def _backbones(args: argparse.Namespace) -> int:
    from retriever.models.backbone import BACKBONES, build_meta_model, count_parameters

    for name, preset in BACKBONES.items():
        params = count_parameters(build_meta_model(name))
        source = preset.hub_id or "random init (seeded)"
        print(f"{name:14s} {preset.kind:6s} {params:>15,d}  {source}")
    return 0


# --------------------------------------------------------------------------------------------------- convert
def _convert_args(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True)
    llama2c = formats.add_parser("llama2c", help="llama2.c checkpoint + tokenizer → HF LlamaForCausalLM directory")
    llama2c.add_argument("checkpoint", type=Path, help="llama2.c model .bin (legacy format)")
    llama2c.add_argument("tokenizer", type=Path, help="llama2.c tokenizer .bin (e.g. tok512.bin)")
    llama2c.add_argument("out_dir", type=Path, help="output directory (HF format)")
    llama2c.add_argument("--overwrite", action="store_true", help="replace an existing model folder")


@command("convert", "import external model formats as Hugging Face models", _convert_args)
def _convert(args: argparse.Namespace) -> int:
    from retriever.models.llama2c import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------------- plan
@command(
    "plan", "print the FLOP-budget plan of every sweep cell", _config_and_flag("--json", "machine-readable output")
)
def _plan(args: argparse.Namespace) -> int:
    """Each cell as the sweep runs it (its `sweep.overrides` applied): batch, step cost and steps."""
    from retriever.config import unmatched_overrides
    from retriever.data.catalog import resolve_references
    from retriever.flops import format_plan, plan_grid, plan_to_json

    cfg = resolve_references(load_config(args.config, args.overrides))
    cells = plan_grid(cfg)
    if args.json:
        _print_json(plan_to_json(cells))
        return 0
    print(format_plan(cells))
    if cfg.mntp.enabled:
        m = cfg.mntp
        print(
            f"pre-training: MNTP once per backbone before the grid ({m.steps:,} steps of {m.batch_size} x "
            f"{m.max_length} tokens, mask {m.mask_probability}, on {m.corpus}); its FLOPs are reported per backbone "
            "and are not part of a cell's budget; every cell continues its backbone's product"
        )
    if cfg.bow.enabled:
        b = cfg.bow
        print(
            f"pre-training: bag-of-words once per backbone x paradigm before the grid ({b.steps:,} steps of "
            f"{b.batch_size} texts, lr {b.lr}, on {b.corpus}; `sweep.overrides` without a loss selector apply); its "
            "FLOPs are reported per stage and are not part of a cell's budget; every cell continues its pair's product"
        )
    for index in unmatched_overrides(cfg):
        print(f"note: sweep.overrides[{index}] matches no cell of this grid (check its selectors)")
    return 0


# --------------------------------------------------------------------------------------------------- train
def _train_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument(
        "--stage",
        choices=["retrieval", "mntp", "bow"],
        default="retrieval",
        help="retrieval fine-tuning (default), the MNTP adaptation stage or bag-of-words pre-training "
        "(the configured backbone x paradigm)",
    )


@command("train", "train one configuration to its FLOP budget (in-process or on Ray Train)", _train_args)
def _train(args: argparse.Namespace) -> int:
    from retriever.train.trainer import run_training

    cfg = load_config(args.config, args.overrides)
    _check_backbones([cfg.backbone.init_weights or cfg.backbone.name])
    result = run_training(cfg, task=args.stage)
    _print_json(result)
    return 0


# --------------------------------------------------------------------------------------------------- data
def data_command(name: str, help_text: str, configure: Configure):
    return command(name, help_text, configure, DATA_COMMANDS)


def _import_classic_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="folder with cran/ med/ cisi/ npl/ (e.g. ../shared/data/classic)")
    parser.add_argument("--home", type=Path, default=None, help="IR_DATASETS_HOME (default: the environment's)")


@data_command(
    "import-classic", "place Cranfield/NPL(vaswani) for ir_datasets, register MED and CISI", _import_classic_args
)
def _import_classic(args: argparse.Namespace) -> int:
    from retriever.data.classic import import_classic

    for dataset_id in import_classic(args.source, args.home):
        print(dataset_id)
    return 0


def _register_beir_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")
    parser.add_argument("path", type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    parser.add_argument("--split", default="test")


@data_command("register-beir", "register a local BEIR folder as local/NAME", _register_beir_args)
def _register_beir(args: argparse.Namespace) -> int:
    from retriever.data.local import register_beir_folder

    print(register_beir_folder(args.name, args.path, split=args.split))
    return 0


def _register_trec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")
    parser.add_argument("--docs", type=Path, help="TSV (id<TAB>text) or JSONL collection")
    parser.add_argument("--topics", type=Path, help="TSV, JSONL or TREC topics")
    parser.add_argument("--qrels", type=Path, help="TREC qrels")


@data_command("register-trec", "register local TREC/TSV/JSONL files as local/NAME", _register_trec_args)
def _register_trec(args: argparse.Namespace) -> int:
    from retriever.data.local import register_trec

    print(register_trec(args.name, docs=args.docs, topics=args.topics, qrels=args.qrels))
    return 0


def _register_pool_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")
    parser.add_argument("results_dir", type=Path, help="folder of rank_llm retrieve_results_*.json.gz files")
    parser.add_argument(
        "--pattern",
        default=None,
        help="glob of the result files under results_dir (default: **/retrieve_results_*.json.gz, every TREC DL "
        "year; e.g. '*/retrieve_results_dl20.json.gz' for one)",
    )
    parser.add_argument("--topics", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, required=True)


@data_command(
    "register-pool", "register the passages of retrieval-result JSON files as local/NAME", _register_pool_args
)
def _register_pool(args: argparse.Namespace) -> int:
    from retriever.data.passage_pool import register_passage_pool

    pattern = {"pattern": args.pattern} if args.pattern is not None else {}
    print(register_passage_pool(args.name, args.results_dir, args.topics, args.qrels, **pattern))
    return 0


@data_command("list", "list the locally registered datasets", lambda p: None)
def _list_local(args: argparse.Namespace) -> int:
    from retriever.data.sources import local_datasets

    for dataset_id in sorted(local_datasets()):
        print(dataset_id)
    return 0


@data_command("synthetic", "generate the synthetic benchmark and its training examples for a config", _config_args)
def _synthetic(args: argparse.Namespace) -> int:
    from retriever.train.trainer import prepare_training_data

    cfg = load_config(args.config, args.overrides)
    path = prepare_training_data(cfg)
    print(f"benchmark: {path.parent}")
    print(f"training examples: {path}")
    return 0


def _examples_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qrels", required=True, help="qrels file (TREC or BEIR TSV)")
    parser.add_argument("--candidates", type=Path, required=True, help="TREC run of candidates (hard negatives)")
    parser.add_argument("--queries", required=True, help="queries file (TSV or BEIR JSONL)")
    parser.add_argument("--docs", required=True, help="dataset id whose docs store gives passage texts")
    parser.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="teacher scores: qid<TAB>docid<TAB>score, or MarginMSE lines pos_score neg_score qid pid_pos pid_neg",
    )
    parser.add_argument("--out", type=Path, required=True, help="output parquet")
    parser.add_argument("--num-negatives", type=POSITIVE, default=16)
    parser.add_argument("--max-candidates", type=POSITIVE, default=None)
    parser.add_argument("--ids-only", action="store_true", help="store passage ids, not texts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


@data_command("examples", "build training examples (parquet) from qrels + candidates + teacher scores", _examples_args)
def _examples(args: argparse.Namespace) -> int:
    from retriever.data.examples import build_training_examples
    from retriever.data.sources import load_source

    report = build_training_examples(
        Path(args.qrels),
        args.candidates,
        Path(args.queries),
        load_source(args.docs).docs_store(),
        args.out,
        teacher=args.teacher,
        num_negatives=args.num_negatives,
        max_candidates=args.max_candidates,
        inline_text=not args.ids_only,
        overwrite=args.overwrite,
    )
    _print_json(report.to_dict())
    return 0


# A group: `retriever data SUBCOMMAND` runs the subcommand's own function.
COMMANDS.add(
    "data",
    (
        "prepare datasets: import, register, synthetic benchmark, training examples",
        lambda parser: add_subcommands(parser, DATA_COMMANDS, "data_command"),
        None,
    ),
)


# --------------------------------------------------------------------------------------------------- evaluate
def _evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="TREC run file (.gz ok)")
    parser.add_argument("--qrels", required=True, help="TREC qrels file or an ir_datasets id")
    parser.add_argument("--protocol", default=None, help="msmarco-dev | trec-dl | beir | synthetic (default: by id)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@command("evaluate", "evaluate a TREC run with a protocol (ranx)", _evaluate_args)
def _evaluate(args: argparse.Namespace) -> int:
    from retriever.evaluation import evaluate_command

    evaluate_command(args.run, args.qrels, args.protocol, as_json=args.json)
    return 0


# --------------------------------------------------------------------------------------------------- encode / index
def _texts_for(dataset: str, kind: str):
    from retriever.data.sources import load_source

    source = load_source(dataset)
    return source.docs() if kind == "passage" else source.queries()


def _encode_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("encoder", type=Path, help="encoder directory (from training)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="dataset id: encode its docs (or its queries with --kind query)")
    source.add_argument("--input", type=Path, help="parquet with columns doc_id, text")
    parser.add_argument("--out", type=Path, required=True, help="output encodings folder")
    parser.add_argument("--kind", choices=["passage", "query"], default="passage")
    parser.add_argument("--max-length", type=POSITIVE, default=None)
    parser.add_argument("--batch-size", type=POSITIVE, default=32)
    parser.add_argument("--prune-top-k", type=POSITIVE, default=None, help="keep the top-k terms per sparse vector")
    parser.add_argument("--actors", type=_at_least(0), default=0, help="Ray Data encoder actors (0: in this process)")
    parser.add_argument("--cpus-per-actor", type=_non_negative, default=1.0)
    parser.add_argument("--gpus-per-actor", type=_non_negative, default=0.0)
    parser.add_argument("--overwrite", action="store_true")


def _check_corpus_parquet(path: Path) -> None:
    """Every parquet file of `--input` opens and has the columns doc_id and text (checked before the encoder is
    loaded; pyarrow's own errors do not name the file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retriever.encoding.inputs import check_corpus_columns, corpus_files

    for file in corpus_files(path):
        try:
            names = pq.ParquetFile(file).schema_arrow.names
        except (pa.ArrowException, OSError) as exc:
            reason = " ".join(str(exc).split())
            raise DataFormatError(
                f"{file}: not a parquet file ({reason[:160]}); --input takes a parquet file or folder with columns "
                "doc_id and text"
            ) from None
        check_corpus_columns(file, names)


@command("encode", "encode a corpus into parquet shards (in-process or Ray Data actors)", _encode_args)
def _encode(args: argparse.Namespace) -> int:
    from retriever.encoding import encode_corpus_auto

    if args.input is not None:
        _check_corpus_parquet(args.input)
    result = encode_corpus_auto(
        args.encoder,
        args.input if args.input is not None else _texts_for(args.dataset, args.kind),
        args.out,
        num_actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        kind=args.kind,
        batch_size=args.batch_size,
        max_length=args.max_length,
        prune_top_k=args.prune_top_k,
        overwrite=args.overwrite,
    )
    print(f"encoded {result.count} texts in {result.seconds:.1f} s ({result.texts_per_second:.0f}/s) -> {args.out}")
    return 0


def _index_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("encodings", type=Path, help="encodings folder (from `retriever encode`)")
    parser.add_argument("--out", type=Path, required=True, help="index folder")
    parser.add_argument(
        "--kind", default=None, help="flat | hnsw (dense), exact | seismic (sparse); default by paradigm"
    )
    parser.add_argument("--shards", type=POSITIVE, default=1)
    parser.add_argument("--prune-doc-top-k", type=POSITIVE, default=None)
    parser.add_argument("--overwrite", action="store_true")


@command("index", "build index shards (FAISS, exact inverted, seismic) with verified manifests", _index_args)
def _index(args: argparse.Namespace) -> int:
    from retriever.index.shards import build_shards

    shards = build_shards(
        args.encodings,
        args.out,
        args.shards,
        args.kind,
        prune_doc_top_k=args.prune_doc_top_k,
        overwrite=args.overwrite,
    )
    for shard in shards:
        print(shard)
    return 0


def _search_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", type=Path, help="index folder (from `retriever index`)")
    parser.add_argument(
        "--queries", type=Path, required=True, help="query encodings (`retriever encode --kind query`)"
    )
    parser.add_argument("--out", type=Path, required=True, help="TREC run file to write")
    parser.add_argument("-k", type=POSITIVE, default=1000, help="hits per query")
    parser.add_argument("--tag", default="retriever")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run file")


@command("search", "search index shards with encoded queries (global top-k merge) into a TREC run", _search_args)
def _search(args: argparse.Namespace) -> int:
    from retriever.index.shards import search_to_run

    run = search_to_run(args.index, args.queries, args.k, output=args.out, tag=args.tag, overwrite=args.overwrite)
    print(f"{len(run)} queries -> {args.out}")
    return 0


def _eval_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("encoder", type=Path, help="encoder directory")
    parser.add_argument("--dataset", action="append", required=True, help="dataset id (repeatable)")
    parser.add_argument("--protocol", default=None, help="override the protocol of every dataset")
    parser.add_argument("--out", type=Path, default=None, help="default: <encoder>/eval")
    parser.add_argument("--config", type=Path, default=None, help="experiment YAML for the eval section")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="e.g. eval.batch_size=128"
    )


@command("eval-checkpoint", "encode, index, search and evaluate an encoder on datasets", _eval_checkpoint_args)
def _eval_checkpoint(args: argparse.Namespace) -> int:
    from retriever.pipeline import METRICS_FILE, evaluate_encoder

    cfg = load_config(args.config, args.overrides)
    out = args.out or args.encoder / "eval"
    results = evaluate_encoder(args.encoder, args.dataset, cfg, out, protocol=args.protocol)
    for dataset, metrics in results.items():
        shown = "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        print(f"{dataset}: {shown}")
    print(f"runs and {METRICS_FILE}: {out}")
    return 0


# --------------------------------------------------------------------------------------------------- sweep
def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray Tune's tables and every trial's output here (default: one progress line; they go to files "
        "in the sweep folder)",
    )


def _sweep_args(parser: argparse.ArgumentParser) -> None:
    _config_and_flag("--resume", "continue an interrupted sweep (finished cells stay)")(parser)
    _verbose_flag(parser)


@command("sweep", "run the backbone x paradigm x loss grid under one FLOP budget (Ray Tune + MLflow)", _sweep_args)
def _sweep(args: argparse.Namespace) -> int:
    from retriever.sweep.run import run_sweep

    cfg = load_config(args.config, args.overrides)
    _check_backbones(cfg.sweep.backbones)
    result = run_sweep(cfg, resume=args.resume, verbose=args.verbose)
    _print_sweep(result)
    return 0 if all(cell.get("status") == "ok" for cell in result.cells) else 1


def _print_sweep(result) -> None:
    report = result.report or {}
    if "markdown" in report:
        print(Path(report["markdown"]).read_text())
    failed = [cell["cell"] for cell in result.cells if cell.get("status") != "ok"]
    if failed:
        print(f"failed cells: {', '.join(failed)} (see {result.directory}/cells/<cell>/result.json and trial.log)")
    print(f"sweep directory: {result.directory}")
    for key, path in sorted(report.items()):
        print(f"  {key}: {path}")


def _report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", type=Path, help="a sweep directory (<output_dir>/sweeps/<name>)")


@command("report", "write the scaling report of a sweep (table, plots, power-law fits)", _report_args)
def _report(args: argparse.Namespace) -> int:
    from retriever.config import config_from_dict
    from retriever.records import SWEEP_STATE_FILE, read_sweep_state
    from retriever.report.sweep_report import write_sweep_report
    from retriever.tracking import open_experiment

    state = read_sweep_state(args.sweep)
    cfg = config_from_dict(state["config"], f"{args.sweep / SWEEP_STATE_FILE}: 'config'")
    tracking = open_experiment(cfg.tracking, cfg.train.output_dir) if state.get("parent_run_id") else None
    for key, path in sorted(write_sweep_report(args.sweep, cfg, state.get("parent_run_id"), tracking).items()):
        print(f"{key}: {path}")
    return 0


def _mine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="mining YAML (e.g. configs/mine.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pool_size=200 teacher.kind=none")
    parser.add_argument("--overwrite", action="store_true", help="start over: remove the shards and manifest in out")


@command(
    "mine",
    "make training data: first-stage candidates, hard negatives and teacher scores, in resumable parquet shards",
    _mine_args,
)
def _mine(args: argparse.Namespace) -> int:
    import logging

    from retriever.config import MineConfig
    from retriever.mining.run import mine

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("retriever.mining").setLevel(logging.INFO)
    settings = load_config(args.config, args.overrides, MineConfig)
    report = mine(settings, overwrite=args.overwrite, base=Path.cwd())
    _print_json(report.to_dict())
    return 0


def _quickstart_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sweep.backbones=[tiny-s]")
    _verbose_flag(parser)


@command(
    "quickstart", "the offline 18-cell sweep on the synthetic benchmark, then its results table", _quickstart_args
)
def _quickstart(args: argparse.Namespace) -> int:
    import time

    from retriever.sweep.grid import STATE_FILE, sweep_dir
    from retriever.sweep.run import run_sweep
    from retriever.tracking import tracking_uri

    cfg = load_config(args.config, args.overrides)
    _check_backbones(cfg.sweep.backbones)
    resume = (sweep_dir(cfg) / STATE_FILE).is_file()
    start = time.perf_counter()
    result = run_sweep(cfg, resume=resume, verbose=args.verbose)
    _print_sweep(result)
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg.tracking, cfg.train.output_dir)
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s")
    return 0 if all(cell.get("status") == "ok" for cell in result.cells) else 1


# --------------------------------------------------------------------------------------------------- serving
def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", help="serve config YAML (models: name, encoder, index)")
    parser.add_argument("--sweep", type=Path, help="serve this sweep's champion encoders (MLflow registry)")
    parser.add_argument("--corpus", help="with --sweep: dataset id to search (default: the sweep's eval corpus)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="e.g. port=8080"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="one process under uvicorn, without Ray")
    mode.add_argument("--deploy-config", type=Path, metavar="OUT", help="write the `serve deploy` YAML and stop")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


@command("serve", "serve encoders and their indexes over HTTP (Ray Serve, or --local)", _serve_args)
def _serve(args: argparse.Namespace) -> int:
    import yaml

    from retriever.config import ServeConfig
    from retriever.serving.catalog import build_catalog, read_token
    from retriever.serving.launch import (
        base_url,
        block_until_interrupted,
        serve_deploy_config,
        serve_in_process,
        serve_on_ray,
    )

    if (args.config is None) == (args.sweep is None):
        raise UserError("serve: give either a serve config YAML or --sweep DIR (one of the two)")
    if args.corpus and args.sweep is None:
        raise UserError("serve: --corpus goes with --sweep; in a serve config, set each model's index and corpus")
    if args.sweep is not None:
        from retriever.serving.champions import SERVE_DIR, champion_config

        settings, tracking = champion_config(args.sweep, args.corpus, args.overrides)
        cache = args.sweep / SERVE_DIR / "models"
    else:
        from retriever.tracking import TRACKING_URI_ENV

        settings = load_config(args.config, args.overrides, ServeConfig)
        tracking, cache = os.environ.get(TRACKING_URI_ENV), args.config.parent / "models"
    models = build_catalog(settings, tracking_uri=tracking, cache_dir=cache)
    if args.deploy_config is not None:
        from retriever.outputs import write_text_atomic

        config = serve_deploy_config(settings, models, tracking_uri=tracking, cache_dir=cache)
        write_text_atomic(args.deploy_config, yaml.safe_dump(config, sort_keys=False))
        print(f"serve deploy config -> {args.deploy_config}  (deploy: serve deploy {args.deploy_config})")
        return 0
    read_token(settings)  # a missing token variable fails here, before anything starts
    names = ", ".join(f"{m.name} ({m.paradigm}, {m.documents} docs, {len(m.shards)} shards)" for m in models)
    url = base_url(settings)
    if args.local:
        print(f"serving {names} at {url}  (search page {url}/, API {url}/docs); Ctrl-C stops", flush=True)
        serve_in_process(settings, models)
        return 0
    ingress = serve_on_ray(settings, models, address=args.address)
    print(f"serving {names} at {url}  (search page {url}/, API {url}/docs)", flush=True)
    if ingress is not None:
        hint = "" if ingress == "haproxy" else "; installing haproxy makes it faster (README, Serving)"
        print(f"ingress: {ingress}{hint}. Ctrl-C stops the service", flush=True)
        block_until_interrupted()
    else:
        print(f"deployed as Serve application {settings.app_name!r}; `serve status` shows it", flush=True)
    return 0


def _query_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the query")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)")
    parser.add_argument(
        "--model", action="append", default=None, help="served model; repeat for hybrid (default: all served)"
    )
    parser.add_argument("-k", type=_at_least(1), default=10, help="hits (default: %(default)s)")
    parser.add_argument("--explain", action="store_true", help="sparse models: the matched terms of each hit")
    parser.add_argument("--text", dest="with_text", action="store_true", help="print each hit's passage text")
    parser.add_argument("--token-env", metavar="VAR", help="environment variable holding the bearer token")


@command("query", "search a running service and print a ranked table", _query_args)
def _query(args: argparse.Namespace) -> int:
    from retriever.serving.client import format_hits, query_service, served_models

    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        raise UserError(f"--token-env {args.token_env}: that environment variable is not set")
    models = args.model or served_models(args.url, token)
    print(
        format_hits(
            query_service(
                args.url, args.text, models, args.k, token=token, explain=args.explain, with_text=args.with_text
            )
        )
    )
    return 0


# --------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retriever", description="Scaling sparse and dense retrievers built on decoder-only LLMs, on Ray."
    )
    add_subcommands(parser, COMMANDS, "command")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (`UserError` and the OS errors about the user's paths) is printed as one line,
    `error: <message>`, with exit status 2; anything else is a bug and keeps its traceback (as does any error with
    RETRIEVER_DEBUG=1)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, *PLAIN_USER_ERRORS) as exc:
        if os.environ.get("RETRIEVER_DEBUG", "").strip() not in ("", "0"):
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The message of `exc`; an OS error without one of ours (`[Errno 13] Permission denied: 'x'`) gets its path
    and reason in our `path: what` form."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.strerror and exc.filename is not None:
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        return f"{target}: {exc.strerror.lower()}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
