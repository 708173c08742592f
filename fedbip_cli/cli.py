"""The ``fedbip`` command line: typer wiring only (parse, one library call, render, exit code)."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedbip_cli import __version__
from fedbip_cli.defaults import (
    COMBINE_NAMES,
    CONFIDENCE,
    DEFAULT_DIM,
    DEFAULT_MAX_SHARD_SIZE,
    DEVICES,
    DTYPE_NAMES,
    ENGINES,
    EVALUATE_BATCH_SIZE,
    EVALUATE_MAX_LENGTH,
    FORMATS,
    GRANULARITIES,
    HEADS,
    MAX_DIM,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    NEGATIVE_MODES,
    RESAMPLES,
    SELECTION_GRID,
    SIMILARITY_METHODS,
    VALIDATION_FRACTION,
    WEIGHTING_NAMES,
)
from fedbip_cli.errors import FedbipError, UsageError
from fedbip_cli.innercache import InnerProductCache, default_cache_dir
from fedbip_cli.shown import shown

# pipeline, report, config and sketch import torch (seconds to load): each command imports them
# in its body, so that --help and --version answer at once (tests/test_startup.py).
if TYPE_CHECKING:
    from fedbip_cli import pipeline

EXIT_CODES = """
[b]Exit codes[/b]  0 done · 1 bad input, or the system refused (disk full, read-only) · 2 bad options · 130 interrupted
"""
ROOT_EPILOG = """[b]Examples[/b]

  fedbip inspect-similarity adapters/

  fedbip merge adapters/ --layerwise --out merged/

  fedbip simulate --rounds 5 --out runs/first

Each command's --help shows its options, more examples and what it exits with.
"""

USAGE_HINT = "run the command with --help to see the accepted options and values"


def _choice(values: tuple[str, ...]) -> dict[str, Any]:
    """An option's accepted values, through typer's public ``parser`` (typer 0.29 vendors click and has
    no ``click_type``; flwr holds typer below 0.21): any other value is refused while parsing, exit code
    2, with the values named; --help shows them as the option's metavar, and completion offers them."""

    def parse(value: str) -> str:
        if value not in values:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, values))}.")
        return value

    return {"parser": parse, "metavar": "[" + "|".join(values) + "]", "autocompletion": lambda: list(values)}


# click's base of every usage error, whichever click typer runs on (its own copy since 0.29).
USAGE_ERRORS = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _json_error(code: str, message: str, hint: str | None) -> None:
    """An error under --json: one JSON object on stdout (``schemas/error.schema.json``)."""
    sys.stdout.write(json.dumps({"code": code, "message": message, "hint": hint}, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class Commands(typer.core.TyperGroup):
    """typer's command group, with one change: under --json, an error found while parsing (an unknown
    option, a value not among an option's choices) is one JSON object on stdout too, with the same
    exit code (2) that click gives it."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        standalone = extra.pop("standalone_mode", True)
        if not standalone or "--json" not in argv:
            return super().main(argv, prog_name, complete_var, standalone_mode=standalone, **extra)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except USAGE_ERRORS as exc:
            _json_error("usage", exc.format_message(), USAGE_HINT)
            code = exc.exit_code
        except typer.Abort:
            _json_error("interrupted", "interrupted", None)
            code = INTERRUPTED
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=Commands,
    name="fedbip",
    epilog=ROOT_EPILOG + EXIT_CODES,
    help="Personalized task-vector merging of LoRA adapters (after FedBip, arXiv 2509.12697).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    rich_markup_mode="rich",
)


def _stdout() -> Console:
    """A console on the current stdout: colour and width are decided now, not at import. No markup:
    a client's name (``[b]c1``) is printed as it is, never rendered (tables style by column)."""
    return Console(markup=False)


def _stderr() -> Console:
    """A console on the current stderr (see ``_stdout``)."""
    return Console(stderr=True)


# typer 0.20 under click 8.5 drops an argument's own help (click's Parameter now sets .help after typer
# does), so what SOURCES may be is said in each command's help, which every version shows.
SOURCES_HELP = (
    "SOURCES: adapters or full fine-tuned models (with --base): a directory of them, single directories, "
    "@FILE (one source a line), or hf://owner/repo\\[@revision]\\[/subfolder]."
)
Layerwise = Annotated[
    bool,
    typer.Option("--layerwise", help="One similarity per transformer block (FedBip-L); same as --granularity block."),
]
Granularity = Annotated[
    str | None,
    typer.Option(
        "--granularity",
        help="model (default), block or module.",
        show_default=False,
        **_choice(GRANULARITIES),
    ),
]
Base = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="Base model (directory or hf://): adapters are checked against it; full checkpoints need it (ΔW = W - W_base).",
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML (or YAML: *.yaml, *.yml) file with sources and any option below (relative paths from its "
        "directory); the command line overrides it. merge and inspect-similarity read the same file.",
        show_default=False,
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.", **_choice(DEVICES))]
Heads = Annotated[
    str | None,
    typer.Option(
        "--heads",
        help="Saved modules (modules_to_save, e.g. a classifier head): merge (compared and merged; against zero "
        "where the base lacks them), own (each client keeps its own, byte for byte; only the LoRA parts are "
        "compared and merged) or exclude (left out of the similarity and the outputs). Without it, saved "
        "modules the base lacks are refused.",
        show_default=False,
        **_choice(HEADS),
    ),
]
CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        help="Inner-product cache directory (default: $XDG_CACHE_HOME/fedbip, else ~/.cache/fedbip).",
        show_default=False,
    ),
]
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="Keep no inner products between runs (the results are the same).")
]
# --device where a config file may give it (merge, inspect-similarity): None = the file's, else auto.
ConfigDevice = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto (CUDA when available, default), cpu or cuda.",
        show_default=False,
        **_choice(DEVICES),
    ),
]
Similarity = Annotated[
    str | None,
    typer.Option(
        "--similarity",
        help="exact (factor space, the default) or sketch: seeded random sketches whose Gram costs K²·M²/2 per module, "
        "for thousands of adapters (LoRA parts sketched, dense parts such as heads exact; approximate, see --sketch-dim).",
        show_default=False,
        **_choice(SIMILARITY_METHODS),
    ),
]
SketchDim = Annotated[
    int | None,
    typer.Option(
        "--sketch-dim",
        help=f"With --similarity sketch: each module's ΔW is reduced to M×M numbers, 1 to {MAX_DIM} (default {DEFAULT_DIM}). "
        "The cosine error falls about as 1/M, the time of the Gram grows as M²; per block or per module fewer numbers "
        "are compared and the error is larger: raise M. Measured errors and times: docs/inspect.md, 'Huge K: "
        "sketched similarity'.",
        show_default=False,
    ),
]
SketchSeed = Annotated[
    int | None,
    typer.Option(
        "--sketch-seed",
        help="With --similarity sketch: the seed of the random projections (default 0); the same seed gives the same bits.",
        show_default=False,
    ),
]


def _version(value: bool) -> None:
    if value:
        _stdout().print(f"fedbip {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Compare many LoRA adapters of one base model and merge one personalized adapter per client."""


INTERRUPTED = 130  # the shell's exit status for a process ended by SIGINT
MAX_ERROR = 500  # characters of an error line or hint: a hostile key or value never floods the terminal


@contextmanager
def _user_errors(as_json: bool = False) -> Iterator[None]:
    """Turn a FedbipError into one line plus a hint and its exit code (traceback with FEDBIP_DEBUG=1);
    under --json (``as_json``) into one JSON object on stdout with the same exit code.

    From here on Ctrl-C raises KeyboardInterrupt, so that what a run staged is removed on the way out.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report = _json_error if as_json else _error_line
    try:
        yield
    except FedbipError as exc:
        if os.environ.get("FEDBIP_DEBUG") == "1":
            raise
        report(exc.code, str(exc), exc.hint)
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:  # the operating system refused (disk full, read-only, permissions): not a bug
        if os.environ.get("FEDBIP_DEBUG") == "1":
            raise
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
        report("system", f"{where}{exc.strerror or exc}", "check the path exists, is writable and has room")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        report("interrupted", "interrupted", None)
        raise typer.Exit(INTERRUPTED) from None


def _error_line(code: str, message: str, hint: str | None) -> None:
    """An error on stderr: ``error: <message>`` and ``hint: <hint>`` (``code`` is for --json)."""
    console = _stderr()
    console.print(f"[bold red]error:[/] {escape(shown(message, MAX_ERROR))}", highlight=False, soft_wrap=True)
    if hint:
        console.print(f"[dim]hint:[/] {escape(shown(hint, MAX_ERROR))}", highlight=False, soft_wrap=True)


@contextmanager
def _progress(enabled: bool) -> Iterator[pipeline.Progress | None]:
    """A rich progress bar on a terminal; nothing when piped or under --json."""
    console = _stderr()
    if not enabled or not console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:

        def start(stage: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(stage, total=total)
            return lambda n: bar.advance(task, n)

        yield start


def _granularity(layerwise: bool, granularity: str | None) -> str | None:
    """The granularity the user asked for (None: not given)."""
    if layerwise and granularity not in (None, "block"):
        raise typer.BadParameter(f"--layerwise means --granularity block, not {granularity}", param_hint="--layerwise")
    return "block" if layerwise else granularity


def _cache_choice(cache: Path | None, no_cache: bool) -> Path | bool | None:
    """``--cache DIR`` (a Path), ``--no-cache`` (False), or neither (None)."""
    if cache is not None and no_cache:
        raise typer.BadParameter("--cache and --no-cache exclude each other", param_hint="--no-cache")
    return False if no_cache else cache


def _cache_dir(cache: Path | None, no_cache: bool) -> Path | None:
    """The cache directory to use: None for no cache, the default one when neither option is given."""
    choice = _cache_choice(cache, no_cache)
    return default_cache_dir() if choice is None else (choice or None)


def _cache_warning(cache: InnerProductCache) -> None:
    """Say on stderr how many cache entries failed verification: they were not used, but recomputed."""
    if cache.stats.rejected:
        _stderr().print(
            f"[yellow]warning:[/] {cache.stats.rejected} inner-product cache entries in {escape(str(cache.path))} "
            "failed verification (tampered with, damaged or written under another key); they were recomputed "
            "and replaced, and did not change the result",
            highlight=False,
            soft_wrap=True,
        )


def _print_json(data: Any) -> None:
    from fedbip_cli import report

    report.write_json(data, sys.stdout)


MERGE_EPILOG = """[b]Examples[/b]

  fedbip merge adapters/ --out merged/

  fedbip merge adapters/ --layerwise --top-k 4 --out merged/ --overwrite

  fedbip merge hf://org/adapters@v1/client-a ./client-b @more.txt --base ./base-model --out merged/

  fedbip merge adapters/ --out merged/ --dry-run --json

  fedbip merge full-ckpts/ --base base/ --out merged/ --max-shard-size 5GB

  fedbip merge full-ckpts/ --base base/ --out merged-adapters/ --to-lora 16

  fedbip merge @10000-adapters.txt --similarity sketch --out merged/

  fedbip merge adapters/ --weighting softmax --sweep temperature=0.5,1,2 --sweep top-k=2,3 --out sweep/
"""


@app.command(
    help="Write one personalized merged adapter (or full checkpoint) per client.\n\n"
    + SOURCES_HELP
    + " They may come from --config instead.",
    epilog=MERGE_EPILOG + EXIT_CODES,
)
def merge(
    sources: Annotated[list[str] | None, typer.Argument(show_default=False)] = None,
    config: ConfigFile = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory: one PEFT adapter (full checkpoints: one checkpoint, or adapter with --to-lora) and model card per client, plus fedbip-manifest.json.",
            show_default=False,
        ),
    ] = None,
    base: Base = None,
    heads: Heads = None,
    layerwise: Layerwise = False,
    granularity: Granularity = None,
    weighting: Annotated[
        str | None,
        typer.Option(
            help="paper (S⁺ normalised per row, default) or softmax.",
            show_default=False,
            **_choice(WEIGHTING_NAMES),
        ),
    ] = None,
    negative: Annotated[
        str | None,
        typer.Option(
            help="clip (negatively similar clients get weight 0, default) or keep.",
            show_default=False,
            **_choice(NEGATIVE_MODES),
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="Softmax temperature (with --weighting softmax; default 1).",
            show_default=False,
            min=MIN_TEMPERATURE,
            max=MAX_TEMPERATURE,
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", help="Keep each client and its K-1 nearest neighbours.", show_default=False),
    ] = None,
    combine: Annotated[
        str | None,
        typer.Option(
            help="svd: exact merge truncated to --rank (default); cat: exact, rank = sum of ranks; linear: A and B averaged separately (FedIT-style, inexact, equal ranks only).",
            show_default=False,
            **_choice(COMBINE_NAMES),
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option(help="Output rank for svd (default: the largest input rank).", show_default=False)
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Dtype of the merged adapters: auto (default: the inputs' dtype when they all agree, else float32), "
            "float32, float16 or bfloat16. float16/bfloat16 round the exact cat merge to their precision.",
            show_default=False,
            **_choice(DTYPE_NAMES),
        ),
    ] = None,
    clip_norm: Annotated[
        str | None,
        typer.Option(
            "--clip-norm",
            help="Scale each client's task vector (each group's part, with --layerwise) down to at most a norm "
            "bound before merging: auto (the median norm, as FLAME), a multiple such as 2x, or a number. Bounds "
            "the influence of a scaled or hostile adapter; the manifest records every norm and clip.",
            show_default=False,
        ),
    ] = None,
    to_lora: Annotated[
        int | None,
        typer.Option(
            "--to-lora",
            help="Full checkpoints: write a rank-R PEFT adapter of each personalized delta (linear layers) instead of checkpoints.",
            show_default=False,
        ),
    ] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            "--max-shard-size",
            help=f"Full checkpoints: the largest output shard (2GB = 2·10⁹ bytes, 500MiB, ...; default {DEFAULT_MAX_SHARD_SIZE}).",
            show_default=False,
        ),
    ] = None,
    device: ConfigDevice = None,
    similarity: Similarity = None,
    sketch_dim: SketchDim = None,
    sketch_seed: SketchSeed = None,
    overwrite: Annotated[
        bool | None,
        typer.Option("--overwrite/--no-overwrite", help="Replace a non-empty --out.", show_default=False),
    ] = None,
    lock: Annotated[
        Path | None,
        typer.Option(
            "--lock",
            help="Lock file: written after the merge with the commit or sha256 every source resolved to.",
            show_default=False,
        ),
    ] = None,
    locked: Annotated[
        bool | None,
        typer.Option(
            "--locked/--no-locked",
            help="Refuse to run if any source resolves differently from --lock (which is then not rewritten).",
            show_default=False,
        ),
    ] = None,
    cache: CacheDir = None,
    no_cache: NoCache = False,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="KEY=V1,V2,...: one output set per value, in OUT/KEY=V/, from one similarity computation; several "
            "--sweep give every combination (OUT/KEY=V,KEY2=W/). KEY: weighting, negative, temperature, top-k, combine "
            "or rank. Each set is exactly the merge with those options; OUT/fedbip-sweep.json lists them.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Resolve (Hub revisions to commits) and validate every source, the base, the lock and --out; print the plan; compute nothing.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
) -> None:
    """Write one personalized merged adapter (or full checkpoint) per client."""
    from fedbip_cli import pipeline, report
    from fedbip_cli.config import merge_settings
    from fedbip_cli.sweep import sweep_settings

    given = {
        "sources": sources or None,
        "out": out,
        "base": base,
        "granularity": _granularity(layerwise, granularity),
        "weighting": weighting,
        "negative": negative,
        "temperature": temperature,
        "top_k": top_k,
        "combine": combine,
        "rank": rank,
        "dtype": dtype,
        "clip_norm": clip_norm,
        "heads": heads,
        "to_lora": to_lora,
        "max_shard_size": max_shard_size,
        "device": device,
        "similarity": similarity,
        "sketch_dim": sketch_dim,
        "sketch_seed": sketch_seed,
        "overwrite": overwrite,
        "lock": lock,
        "locked": locked,
        "cache": _cache_choice(cache, no_cache),
    }
    with _user_errors(as_json):
        settings = merge_settings(config, {key: value for key, value in given.items() if value is not None})
        named = sweep_settings(settings.options, sweep) if sweep else None  # checked before any source is read
        if named and dry_run:
            raise UsageError("--sweep with --dry-run", hint="plan one setting at a time without --sweep")
        workspace = pipeline.load(
            settings.sources,
            base=settings.base,
            base_dir=settings.source_dir,
            lock=settings.lock,
            locked=settings.locked,
            weights=not dry_run,
            heads=settings.options.heads,
        )
        if dry_run:
            the_plan = pipeline.plan(workspace, settings.options, settings.out, overwrite=settings.overwrite)
            _print_json({"dry_run": True, **the_plan}) if as_json else _stdout().print(
                report.plan_table(the_plan, settings.out)
            )
            return
        if named:
            _merge_sweep(workspace, settings, named, as_json=as_json)
            return
        with InnerProductCache(settings.cache) as inner_cache, _progress(not as_json) as progress:
            result = pipeline.merge(
                workspace,
                settings.options,
                settings.out,
                overwrite=settings.overwrite,
                progress=progress,
                cache=inner_cache,
            )
    _cache_warning(inner_cache)
    if as_json:
        _print_json(
            {
                **report.merge_summary(result),
                "cache": report.cache_json(inner_cache),
                "lock": report.lock_json(workspace.lock, written=result.lock_written),
            }
        )
    else:
        _stdout().print(report.merge_table(result))


def _merge_sweep(workspace: Any, settings: Any, named: list[tuple[str, Any]], *, as_json: bool) -> None:
    """``merge --sweep``: every setting's output set written, then shown (one table or JSON summary each)."""
    from fedbip_cli import pipeline, report

    with InnerProductCache(settings.cache) as inner_cache, _progress(not as_json) as progress:
        results = pipeline.merge_sweep(
            workspace, named, settings.out, overwrite=settings.overwrite, progress=progress, cache=inner_cache
        )
    _cache_warning(inner_cache)
    if as_json:
        summaries = {name: report.merge_summary(result) for (name, _), result in zip(named, results)}
        lock = report.lock_json(workspace.lock, written=results[0].lock_written)
        _print_json({"sweep": summaries, "cache": report.cache_json(inner_cache), "lock": lock})
        return
    for (name, _), result in zip(named, results):
        _stdout().print(f"[b]{escape(name)}[/b]")
        _stdout().print(report.merge_table(result))


INSPECT_EPILOG = """[b]Examples[/b]

  fedbip inspect-similarity adapters/

  fedbip inspect-similarity adapters/ --layerwise --heatmap similarity.png

  fedbip inspect-similarity adapters/ --format json | jq '.groups.model.similarity'

  fedbip inspect-similarity full-ckpts/ --base base/ --layerwise

  fedbip inspect-similarity many-adapters/ --similarity sketch --sketch-dim 128 --format json

  fedbip inspect-similarity 10k-adapters/ --similarity sketch --matrix sim.safetensors --format json
"""


@app.command(
    "inspect-similarity",
    help="Show how similar the clients' task vectors are, with nearest neighbours and clusters.\n\n"
    + SOURCES_HELP
    + " They may come from --config instead.",
    epilog=INSPECT_EPILOG + EXIT_CODES,
)
def inspect_similarity(
    sources: Annotated[list[str] | None, typer.Argument(show_default=False)] = None,
    config: ConfigFile = None,
    base: Base = None,
    heads: Heads = None,
    layerwise: Layerwise = False,
    granularity: Granularity = None,
    output_format: Annotated[str, typer.Option("--format", help="table, json or csv.", **_choice(FORMATS))] = "table",
    as_json: Annotated[bool, typer.Option("--json", help="The same as --format json.")] = False,
    heatmap: Annotated[
        Path | None,
        typer.Option("--heatmap", help="Also write a heatmap PNG (one panel per group).", show_default=False),
    ] = None,
    matrix: Annotated[
        Path | None,
        typer.Option(
            "--matrix",
            help="Also write each group's K x K similarity (float64) to this safetensors file; --format json then leaves the matrices out.",
            show_default=False,
        ),
    ] = None,
    neighbours: Annotated[int, typer.Option(help="Nearest neighbours to list per client.", min=0)] = 3,
    device: ConfigDevice = None,
    cache: CacheDir = None,
    no_cache: NoCache = False,
    similarity: Similarity = None,
    sketch_dim: SketchDim = None,
    sketch_seed: SketchSeed = None,
) -> None:
    """Show how similar the clients' task vectors are, with nearest neighbours and clusters."""
    if as_json and output_format not in ("table", "json"):
        raise typer.BadParameter(f"--json means --format json, not {output_format}", param_hint="--json")
    output_format = "json" if as_json else output_format
    from fedbip_cli import pipeline, report
    from fedbip_cli.config import inspect_settings
    from fedbip_cli.outdir import Outputs

    given = {
        "sources": sources or None,
        "base": base,
        "heads": heads,
        "granularity": _granularity(layerwise, granularity),
        "device": device,
        "similarity": similarity,
        "sketch_dim": sketch_dim,
        "sketch_seed": sketch_seed,
        "cache": _cache_choice(cache, no_cache),
    }
    with _user_errors(output_format == "json"):
        settings = inspect_settings(config, {key: value for key, value in given.items() if value is not None})
        if heatmap is not None:
            report.check_image_path(heatmap)
        if matrix is not None:
            report.check_matrix_path(matrix)
        workspace = pipeline.load(
            settings.sources, base=settings.base, base_dir=settings.source_dir, heads=settings.heads
        )
        with InnerProductCache(settings.cache) as inner_cache, _progress(output_format == "table") as progress:
            result = pipeline.inspect(
                workspace,
                granularity=settings.granularity,
                device=settings.device,
                progress=progress,
                cache=inner_cache,
                similarity=settings.method.name,
                sketch_dim=settings.method.dim,
                sketch_seed=settings.method.seed,
            )
        with Outputs() as outputs:  # the heatmap and the matrix file: both written, or neither
            if heatmap is not None:
                report.write_heatmap(result, outputs.file(heatmap, check=report.check_image_path))
            if matrix is not None:
                report.write_matrices(result, outputs.file(matrix, check=report.check_matrix_path))
    _cache_warning(inner_cache)
    _show_similarity(result, output_format, neighbours=neighbours, matrix=matrix, heatmap=heatmap, cache=inner_cache)


def _show_similarity(
    result: Any, output_format: str, *, neighbours: int, matrix: Path | None, heatmap: Path | None, cache: Any
) -> None:
    """``inspect-similarity``'s output on stdout: JSON, CSV or tables."""
    from fedbip_cli import report

    if output_format == "json":
        data = report.similarity_json_tensors(result, neighbours=neighbours, matrix=matrix)
        _print_json({**data, "cache": report.cache_json(cache)})
    elif output_format == "csv":
        sys.stdout.write(report.similarity_csv(result))
    else:
        for renderable in report.similarity_tables(result, neighbours=neighbours):
            _stdout().print(renderable)
        if heatmap is not None:
            _stdout().print(f"heatmap written to {heatmap}")


SIMULATE_EPILOG = """[b]Examples[/b]

  fedbip simulate --rounds 50

  fedbip simulate --compare fedbip,fedbip-layerwise,fedamp,fedavg,local,oracle --seeds 0,1,2 --out runs/shift

  fedbip simulate --partition tasks --alpha 1 --examples-per-client 64 --compare fedbip,fedavg,local --out runs/skew

  fedbip simulate --partition tasks --alpha inf --compare fedbip,fedavg,local,oracle --out runs/relabel

  fedbip simulate --partition dirichlet --alpha 0.1 --participation 0.5 --out runs/dir

  fedbip simulate --data my-clients/ --strategy fedbip-layerwise --out runs/mine

  fedbip simulate --out runs/seed1 --resume

  fedbip simulate --compare fedbip,fedavg --clients 6 --attack backdoor --attackers 1 --clip-norm auto --out runs/bd
"""


@app.command(epilog=SIMULATE_EPILOG + EXIT_CODES)
def simulate(
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 50,
    clients: Annotated[int, typer.Option(help="Number of clients (ignored with --data).")] = 10,
    strategy: Annotated[
        str,
        typer.Option(
            help="fedbip, fedbip-layerwise, fedamp, uniform, fedavg, local, oracle, or the variants "
            "fedbip-cumulative, fedbip-layerwise-cumulative (similarity of whole trajectories), "
            "fedbip-ema, fedbip-layerwise-ema (of an EMA of past updates); the methods fedoa (a FedAvg global "
            "adapter and a personal adapter per client), fedmerge (d global models merged per client), tap "
            "(personal models that take components of the FedAvg one, distilled at the end), universal-expert "
            "(cluster models and a universal expert distilled on public sentences); the methods run in-process only."
        ),
    ] = "fedbip",
    compare: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated strategies run on identical data, seeds and initial adapter.", show_default=False
        ),
    ] = None,
    partition: Annotated[
        str,
        typer.Option(
            help="task-shift (each task group does a different task: topic, quote, place), tasks (groups "
            "relabel the topics differently) or dirichlet (label skew on one task)."
        ),
    ] = "task-shift",
    groups: Annotated[int, typer.Option(help="Task groups for --partition task-shift or tasks.")] = 3,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Dirichlet concentration of each client's label mix, or inf for none: a uniform, stratified "
            "draw (default inf for task-shift, 1.0 for tasks, 0.1 for dirichlet).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Your own clients: DIR/<client>.jsonl or .csv with text and label.", show_default=False),
    ] = None,
    examples_per_client: Annotated[
        int,
        typer.Option(
            help="Training sentences per client (the data regime; each client also gets 400 test sentences). "
            "32 = limited data, the FedBip premise; 480 = ample. 0 = split --max-examples by --test-fraction.",
            min=0,
        ),
    ] = 32,
    max_examples: Annotated[
        int, typer.Option(help="With --examples-per-client 0: sentences of the embedded data used in all (0 = all).")
    ] = 6000,
    model: Annotated[
        str | None,
        typer.Option(
            help="A local Hugging Face encoder directory or hf:// reference (default: the embedded all-MiniLM-L6-v2).",
            show_default=False,
        ),
    ] = None,
    num_layers: Annotated[
        int | None,
        typer.Option(help="Keep only the first N encoder layers (quick experiments).", show_default=False),
    ] = None,
    target_modules: Annotated[str, typer.Option(help="Comma-separated LoRA target modules.")] = "query,value",
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    local_steps: Annotated[int, typer.Option(help="Local optimizer steps per round.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = 16,
    lr: Annotated[float, typer.Option(help="Local AdamW learning rate.")] = 1e-3,
    max_length: Annotated[int, typer.Option(help="Tokens per sentence.")] = 32,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N rounds (and at the last).")] = 5,
    participation: Annotated[float, typer.Option(help="Fraction of clients sampled per round.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the partition, initial adapter, batches and sampling.")] = 0,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated seeds, each a full run in OUT/seed-<s>; ends with mean ± sd over seeds.",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="inprocess (every client in this process) or flower (Flower's Simulation Engine: one "
            "SuperNode per client; needs fedbip's flower extra: `python -m pip install '.\\[flower]'` in a clone).",
            **_choice(ENGINES),
        ),
    ] = "inprocess",
    attack: Annotated[
        str,
        typer.Option(
            help="none, scaled (attackers send their update × --attack-scale) or backdoor (attackers train "
            "half their sentences with --trigger and --target-label). ASR per client goes into the metrics."
        ),
    ] = "none",
    attackers: Annotated[
        int | None, typer.Option(help="Attacking clients (default 1 with --attack).", show_default=False)
    ] = None,
    attack_scale: Annotated[
        float | None,
        typer.Option(
            help="Update multiplier of the attackers (default 10 for scaled, 1 for backdoor).", show_default=False
        ),
    ] = None,
    trigger: Annotated[str, typer.Option(help="The backdoor's trigger word.")] = "cf",
    target_label: Annotated[
        str | None, typer.Option(help="The backdoor's target label (default: the first label).", show_default=False)
    ] = None,
    clip_norm: Annotated[
        str | None,
        typer.Option(
            "--clip-norm",
            help="Server-step defence: bound each update's norm at auto (the round's median norm), Kx (K × median) "
            "or VALUE, before the strategy's weights apply.",
            show_default=False,
        ),
    ] = None,
    fedoa_lambda: Annotated[
        float,
        typer.Option(
            "--fedoa-lambda", help="fedoa: weight λ of the personal adapter's feature distance to the global one."
        ),
    ] = 0.5,
    global_models: Annotated[int, typer.Option(help="fedmerge: the number d of global models.")] = 5,
    fedmerge_lr_w: Annotated[
        float, typer.Option("--fedmerge-lr-w", help="fedmerge: how far W's largest entry moves per round.")
    ] = 0.01,
    tap_margin: Annotated[
        float, typer.Option(help="tap: a component is replaced when the federated one's loss is lower by this.")
    ] = 0.005,
    tap_kd_steps: Annotated[int, typer.Option(help="tap: distillation steps after the last round.")] = 13,
    tap_kd_weight: Annotated[float, typer.Option(help="tap: weight of the distillation term.")] = 0.05,
    tap_temperature: Annotated[float, typer.Option(help="tap: distillation temperature.")] = 1.0,
    public_examples: Annotated[
        int, typer.Option(help="universal-expert: public unlabeled sentences held out of every client.")
    ] = 256,
    distill_steps: Annotated[int, typer.Option(help="universal-expert: distillation steps per round.")] = 16,
    select_on_validation: Annotated[
        bool,
        typer.Option(
            "--select-on-validation",
            help="Each client holds out --validation-fraction of its training sentences and, every round, keeps "
            "the best on them of its own trained model, the merge it receives and their interpolations "
            f"(λ = {', '.join(f'{w:g}' for w in SELECTION_GRID)}); the server sees nothing new.",
        ),
    ] = False,
    validation_fraction: Annotated[
        float, typer.Option(help="The share of each client's training sentences held out by --select-on-validation.")
    ] = VALIDATION_FRACTION,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("fedbip-simulation"),
    export_data: Annotated[
        Path | None,
        typer.Option(
            "--export-data",
            help="Also write each client's sentences as DIR/train/<client>.jsonl and DIR/test/<client>.jsonl "
            "(DIR/seed-<s>/... with --seeds): what --data and `fedbip evaluate --data` read.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last complete round in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    device: Device = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print summary.json on stdout; no progress or round lines.")
    ] = False,
) -> None:
    """Run federated LoRA fine-tuning rounds on non-IID data with FedBip or a baseline."""
    from fedbip_cli import report
    from fedbip_cli.simulate.attacks import SCALED_DEFAULT
    from fedbip_cli.simulate.loop import SimulationConfig
    from fedbip_cli.simulate.runner import simulate as run_simulation
    from fedbip_cli.simulate.seeds import parse_seeds, seeds_table

    with _user_errors(as_json):
        seed_list = parse_seeds(seeds) if seeds is not None else None
        if engine == "flower" and attack != "none":
            raise UsageError("--attack is not wired to --engine flower", hint="use --engine inprocess")
        if engine == "flower" and select_on_validation:
            raise UsageError("--select-on-validation is not wired to --engine flower", hint="use --engine inprocess")
        if engine == "flower" and export_data is not None:
            raise UsageError(
                "--export-data is not wired to --engine flower",
                hint="export with --engine inprocess: both engines partition the data the same way for one seed",
            )
        config = SimulationConfig(
            strategies=tuple(s.strip() for s in (compare or strategy).split(",") if s.strip()),
            rounds=rounds,
            clients=clients,
            partition=partition,
            groups=groups,
            alpha=alpha,
            data_dir=str(data) if data is not None else None,
            max_examples=max_examples or None,
            examples_per_client=examples_per_client or None,
            model=model,
            num_layers=num_layers,
            target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()),
            rank=rank,
            local_steps=local_steps,
            batch_size=batch_size,
            lr=lr,
            max_length=max_length,
            eval_every=eval_every,
            participation=participation,
            seed=seed,
            attack=attack,
            attackers=(1 if attack != "none" else 0) if attackers is None else attackers,
            attack_scale=(SCALED_DEFAULT if attack == "scaled" else 1.0) if attack_scale is None else attack_scale,
            trigger=trigger,
            target_label=target_label,
            clip_norm=clip_norm,
            fedoa_lambda=fedoa_lambda,
            global_models=global_models,
            fedmerge_lr_w=fedmerge_lr_w,
            tap_margin=tap_margin,
            tap_kd_steps=tap_kd_steps,
            tap_kd_weight=tap_kd_weight,
            tap_temperature=tap_temperature,
            public_examples=public_examples,
            distill_steps=distill_steps,
            select_on_validation=validation_fraction if select_on_validation else None,
        )

        def round_line(name: str, round_: int, accuracy: float | None) -> None:
            if accuracy is not None and not as_json:
                _stderr().print(f"{name:<24} round {round_:>3}/{rounds}  mean accuracy {accuracy:.4f}", highlight=False)

        if engine == "flower":
            result = _simulate_on_flower(config, out, overwrite=overwrite, resume=resume, seeds=seed_list)
        else:
            with _progress(not as_json) as progress:
                result = run_simulation(
                    config,
                    out,
                    seed_list=seed_list,
                    resume=resume,
                    overwrite=overwrite,
                    device=device,
                    progress=progress,
                    round_done=round_line,
                    export=export_data,
                )
    if as_json:
        _print_json(result.summary)
    elif seed_list is not None:
        _stdout().print(seeds_table(result.summary, f"fedbip simulate → {out}"))
    else:
        _stdout().print(report.simulation_table(result.summary, out))


EVALUATE_EPILOG = """[b]Examples[/b]

  fedbip evaluate --own run/adapters merged/ --data data/test --base run/base

  fedbip evaluate --own run/adapters merged/* --data data/test --base run/base --pick picked/

  fedbip evaluate --own mine/ community-merge/ --data held-out/ --base base/ --fail-if-worse 0.01 --json
"""
GATE_FAILED = 3  # --fail-if-worse: some candidate is worse than a client's own beyond the margin


@app.command(
    help="Score each client's own adapter and each CANDIDATE (sets of adapters, one per client) on the client's "
    "held-out data, with a paired confidence interval of the difference and a verdict: helps, hurts or undecided.",
    epilog=EVALUATE_EPILOG
    + EXIT_CODES.replace(" · 130", f" · {GATE_FAILED} --fail-if-worse: a candidate is worse than own · 130"),
)
def evaluate(
    candidates: Annotated[list[str], typer.Argument(show_default=False)],
    own: Annotated[
        str, typer.Option("--own", help="The clients' own adapters: a directory of them (or any SOURCES form).")
    ],
    data: Annotated[
        Path, typer.Option("--data", help="DIR/<client>.jsonl or .csv of held-out rows: text, and label to classify.")
    ],
    base: Annotated[str, typer.Option("--base", help="The base model the adapters apply to (directory or hf://).")],
    max_length: Annotated[
        int, typer.Option(help="Tokens per sentence (as simulate's --max-length).", min=1)
    ] = EVALUATE_MAX_LENGTH,
    batch_size: Annotated[int, typer.Option(help="Sentences per forward pass.", min=1)] = EVALUATE_BATCH_SIZE,
    device: Device = "auto",
    resamples: Annotated[int, typer.Option(help="Paired bootstrap resamples of each interval.", min=1)] = RESAMPLES,
    confidence: Annotated[float, typer.Option(help="The intervals' confidence level.")] = CONFIDENCE,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap draws.", min=0)] = 0,
    fail_if_worse: Annotated[
        float | None,
        typer.Option(
            "--fail-if-worse",
            help=f"Exit {GATE_FAILED} when a candidate is worse than a client's own by more than MARGIN (accuracy, "
            "or mean token loss) even at the favourable end of its interval: a CI gate. 0 fails on every 'hurts'.",
            min=0.0,
            show_default=False,
        ),
    ] = None,
    pick: Annotated[
        Path | None,
        typer.Option(
            "--pick",
            help="Write per client a copy of the best-scoring adapter (own first among equals) with a card saying what "
            "was compared and why it won.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --pick directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
) -> None:
    """Does a merged adapter help its client? Own against candidates on held-out data."""
    from fedbip_cli.evaluate.pick import write_picks
    from fedbip_cli.evaluate.render import evaluation_json, evaluation_table
    from fedbip_cli.evaluate.run import EvaluateOptions
    from fedbip_cli.evaluate.run import evaluate as run_evaluation

    with _user_errors():
        options = EvaluateOptions(max_length, batch_size, device, resamples, confidence, seed)
        with _progress(not as_json) as progress:
            result = run_evaluation(own, candidates, data, base, options, progress=progress)
        if pick is not None:
            sets = [Path(spec).absolute() for spec in (own, *candidates) if Path(spec).is_dir()]
            adapters = sorted({path for r in result.clients for path in r.adapters.values()})
            write_picks(result, pick, [data.absolute(), *sets, *adapters], overwrite=overwrite)
    if as_json:
        _print_json(evaluation_json(result, margin=fail_if_worse, picked=None if pick is None else str(pick)))
    else:
        _stdout().print(evaluation_table(result))
    failed = [] if fail_if_worse is None else result.worse(fail_if_worse)
    if failed:
        pairs = ", ".join(f"{candidate} for {client}" for client, candidate in failed)
        _error_line("gate", f"worse than own by more than {fail_if_worse} beyond the interval: {pairs}", None)
        raise typer.Exit(GATE_FAILED)


def _simulate_on_flower(config: Any, out: Path, *, overwrite: bool, resume: bool, seeds: list[int] | None) -> Any:
    """``simulate --engine flower``: the run on Flower's Simulation Engine (flwr imported only here)."""
    from fedbip_cli.simulate.methods import check_flower_strategies

    check_flower_strategies(config)
    try:
        from fedbip_cli.simulate.flower.engine import simulate_on_flower
    except ImportError as exc:
        raise UsageError(
            f"--engine flower needs Flower ({exc})",
            hint="install fedbip with its flower extra: python -m pip install '.[flower]' in a clone of fedbip (or its wheel with [flower])",
        ) from None
    return simulate_on_flower(config, out, seed_list=seeds, resume=resume, overwrite=overwrite)


FLOWER_CREDENTIALS_EPILOG = """[b]Examples[/b]

  fedbip flower-credentials secrets/ --supernodes 3

  fedbip flower-credentials secrets/ --supernodes alice,bob --host superlink.example.org

Writes a CA, the SuperLink's TLS certificate and one key pair per SuperNode; a file already there is
kept and used, never replaced. docs/flower.md shows the SuperLink and SuperNode flags that use them.
"""


@app.command("flower-credentials", epilog=FLOWER_CREDENTIALS_EPILOG + EXIT_CODES)
def flower_credentials(
    directory: Annotated[Path, typer.Argument(metavar="DIR", show_default=False)],
    supernodes: Annotated[
        str, typer.Option("--supernodes", help="The SuperNodes' names, comma-separated, or a count N (names 0 … N-1).")
    ],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host", help="A host name or IP address of the SuperLink (repeat; default 127.0.0.1, localhost)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the files as JSON on stdout.")] = False,
) -> None:
    """Write into DIR (created if missing) the certificates and SuperNode keys of an authenticated Flower
    deployment (TLS, --enable-supernode-auth)."""
    with _user_errors():
        from fedbip_cli.simulate.flower.credentials import DEFAULT_HOSTS, write_credentials

        names = [str(i) for i in range(int(supernodes))] if supernodes.isdigit() else supernodes.split(",")
        made = write_credentials(directory, names, hosts=host or DEFAULT_HOSTS)
    if as_json:
        _print_json(
            {
                "directory": str(made.directory),
                "ca": str(made.ca),
                "supernodes": {name: str(key) for name, key in made.supernodes.items()},
                "written": [str(path) for path in made.written],
            }
        )
        return
    console = _stdout()
    for path in made.written:
        console.print(f"wrote {escape(str(path))}", highlight=False)
    if not made.written:
        console.print(f"{escape(str(made.directory))}: every file was there already; nothing written", highlight=False)


def _interrupted_at_start(signum: int, frame: object) -> None:
    """Ctrl-C before a command starts its work: nothing is written yet, so stop at once. (Raising in the
    middle of importing torch or numpy leaves them half imported, and they report another error.)"""
    os.write(2, b"interrupted\n")
    os._exit(INTERRUPTED)


def main() -> None:
    """Console-script entry point. Ctrl-C exits 130 without a traceback: at once during start-up, and
    once a command runs (``_user_errors``) after removing whatever it had staged (``outdir.Outputs``)."""
    signal.signal(signal.SIGINT, _interrupted_at_start)
    app()
