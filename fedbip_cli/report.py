"""Render a similarity result: rich tables, JSON, CSV and heatmap images.

Everything here takes a ``similarity.SimilarityResult`` (read by duck typing: ``clients``,
``granularity`` and ``groups``, each group with ``modules``, ``similarity`` and ``norms``) and only
formats it; the structure it shows (neighbours, clusters, the mean over groups) comes from
``clustering``. Nothing prints: tables are returned for the CLI to render.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from fedbip_cli.clustering import mean_similarity, nearest_neighbours, suggest_clusters
from fedbip_cli.defence import outliers
from fedbip_cli.errors import OutputError
from fedbip_cli.merge import energy_range
from fedbip_cli.shown import shown
from fedbip_cli.simulate.seeds import COST_COLUMNS, cost_cells

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Client names longer than this are shortened in tables and plots (JSON and CSV keep them whole).
NAME_WIDTH = 24
# Group names keep their tail, which tells blocks and modules apart ("…layer.11.attn.q_proj").
GROUP_WIDTH = 32
# Heatmap cells carry their value when there are at most this many clients and panels; beyond,
# the numbers are unreadable and thousands of text objects make drawing slow.
ANNOTATE_MAX_CLIENTS = 12
ANNOTATE_MAX_PANELS = 36

# Metadata that would embed the date or the library version; dropping it makes re-runs
# byte-identical.
# No dates or library versions (the same run writes the same bytes); the creator is fedbip, which
# is what proves an existing file fedbip's to replace (``_check_output_path``).
_DETERMINISTIC_METADATA: dict[str, dict[str, str | None]] = {
    "png": {"Software": "fedbip"},
    "pdf": {"Creator": "fedbip", "Producer": None, "CreationDate": None},
    "svg": {"Creator": "fedbip", "Date": None},
}
MARK = b"fedbip"
_MARK_SPAN = 2**16  # bytes at each end of a file searched for the mark: where each format keeps its metadata


def similarity_tables(result: Any, *, neighbours: int = 3) -> list[RenderableType]:
    """Tables that summarise a similarity result for the terminal.

    For granularity "model": the K x K matrix with each client's nearest neighbours, then the
    suggested clusters. Layer-wise: the same for the mean of the per-group matrices, then one row
    per group with its number of modules and its own suggested clusters (by client number).

    Args:
        result: a ``similarity.SimilarityResult``.
        neighbours: nearest neighbours listed per client.

    Returns:
        rich renderables, in display order.
    """
    clients = list(result.clients)
    overview = mean_similarity(result)
    if result.granularity == "model":
        title = "Cosine similarity of task vectors (whole model)"
    else:
        title = (
            f"Mean cosine similarity over {len(result.groups)} {result.granularity} groups "
            "(plain mean of the per-group matrices)"
        )
    method = result.method
    if method["method"] == "sketch":
        title += (
            f"; sketched: {method['dim']} x {method['dim']} numbers per module, seed {method['seed']} (approximate)"
        )
    renderables: list[RenderableType] = [
        _matrix_table(clients, overview, title, neighbours),
        _clusters_line(clients, suggest_clusters(overview)),
    ]
    if covers_line(result.covers):
        renderables.insert(1, Text(covers_line(result.covers), style="dim"))
    if result.granularity != "model":
        renderables.append(_groups_table(result))
    flagged = outlier_lines(clients, result)
    if flagged:
        renderables.append(Text("\n".join(flagged), style="yellow"))
    return renderables


def covers_line(covers: dict[str, Any] | None) -> str:
    """What the similarity covers, in words: ``similarity over 24 parts (lora 22, saved 2)`` and, with
    saved modules, what ``--heads`` did with them; nothing when every part is of one kind and no client
    saves a module (the similarity then covers the whole task vectors)."""
    if not covers or (covers["heads"] is None and len(covers["parts"]) == 1):
        return ""
    parts = covers["parts"]
    line = f"similarity over {sum(parts.values())} parts (" + ", ".join(f"{k} {n}" for k, n in parts.items()) + ")"
    heads, left_out = covers["heads"], ", ".join(covers["left_out"])
    if heads == "own":
        line += f"; saved modules {left_out} left out, each client keeps its own (--heads own)"
    elif heads == "exclude":
        line += f"; saved modules {left_out} left out of the similarity and the outputs (--heads exclude)"
    elif heads == "merge":
        line += "; saved modules compared and merged (--heads merge)"
    return line


def outlier_lines(clients: list[str], result: Any) -> list[str]:
    """One line per group with a flagged client or near copy (``defence.outliers``); none when nothing stands out."""
    lines = []
    for name, group in result.groups.items():
        found = outliers(clients, group.similarity, group.norms)
        parts = [f"{o['client']} has an outlying norm {o['value']:.3g}" for o in found["norm"]]
        parts += [f"{o['client']} has an outlying mean similarity {o['value']:.3f}" for o in found["similarity"]]
        parts += [f"{' and '.join(c['clients'])} are near copies ({c['similarity']:.4f})" for c in found["near_copies"]]
        if parts:
            lines.append(f"outliers ({name}): " + "; ".join(parts))
    return lines


def similarity_json(result: Any, *, neighbours: int = 3) -> dict[str, Any]:
    """A JSON-ready dict of a similarity result, floats at full precision.

    ``clusters`` and ``neighbours`` are read from the model-level matrix, or for a layer-wise
    result from the plain mean of its group matrices.

    Args:
        result: a ``similarity.SimilarityResult``.
        neighbours: nearest neighbours listed per client.

    Returns:
        ``{"clients", "granularity", "similarity": {"method", ...}, "groups": {name: {"similarity",
        "modules", "norms"}}, "clusters": [[client, ...], ...], "neighbours": {client: [[client,
        similarity], ...]}}``.
    """
    data = similarity_json_tensors(result, neighbours=neighbours)
    for group in data["groups"].values():
        group["similarity"], group["norms"] = group["similarity"].tolist(), group["norms"].tolist()
    return data


def similarity_json_tensors(result: Any, *, neighbours: int = 3, matrix: Path | None = None) -> dict[str, Any]:
    """``similarity_json`` with each group's ``similarity`` and ``norms`` left as float64 tensors,
    for ``write_json`` to stream (a 10 000-client matrix as Python floats would take 3 GB).

    With ``matrix`` (where ``write_matrices`` wrote them) the groups carry no ``similarity``; the
    top-level ``matrix`` names the file instead.
    """
    clients = list(result.clients)
    overview = mean_similarity(result)
    data = {
        "clients": clients,
        "granularity": result.granularity,
        "similarity": result.method,
        "groups": {
            name: {
                "similarity": group.similarity.to(torch.float64),
                "modules": list(group.modules),
                "norms": group.norms.to(torch.float64),
                "outliers": outliers(clients, group.similarity, group.norms),
            }
            for name, group in result.groups.items()
        },
        "clusters": [[clients[i] for i in cluster] for cluster in suggest_clusters(overview)],
        "neighbours": {
            clients[i]: [[clients[j], value] for j, value in row]
            for i, row in enumerate(nearest_neighbours(overview, neighbours))
        },
        "covers": result.covers,
    }
    if matrix is not None:
        for group in data["groups"].values():
            del group["similarity"]
        data["matrix"] = str(matrix)
    return data


def write_json(data: Any, stream: TextIO, *, indent: int = 2) -> None:
    """Write ``data`` as JSON to ``stream``: objects and lists of objects indented, a list of numbers
    or strings on one line, a matrix (a list of such lists, or a 2-D tensor) one row per line.

    Tensors are written a row at a time, so the output of a 10 000-client similarity matrix (about
    2 GB of text) streams in bounded memory; floats keep full precision (``json``'s own repr).
    """
    _write_json(data, stream, indent, 0)
    stream.write("\n")


def _write_json(value: Any, stream: TextIO, indent: int, level: int) -> None:
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(value, torch.Tensor) and value.ndim < 2:
        stream.write(json.dumps(value.tolist()))
        return
    if isinstance(value, dict):
        if not value:
            stream.write("{}")
            return
        for i, (key, item) in enumerate(value.items()):
            stream.write(("," if i else "{") + "\n" + inner + json.dumps(str(key)) + ": ")
            _write_json(item, stream, indent, level + 1)
        stream.write("\n" + pad + "}")
        return
    if isinstance(value, (list, tuple)) and all(_scalar(item) for item in value):
        stream.write(json.dumps(value))
        return
    if not isinstance(value, (list, tuple, torch.Tensor)):
        stream.write(json.dumps(value))
        return
    if len(value) == 0:
        stream.write("[]")
        return
    for i, item in enumerate(value):  # a 2-D tensor gives its rows one at a time
        stream.write(("," if i else "[") + "\n" + inner)
        _write_json(item, stream, indent, level + 1)
    stream.write("\n" + pad + "]")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def cache_json(cache: Any) -> dict[str, Any]:
    """Where the inner-product cache lives and what it served in this run.

    Args:
        cache: an ``innercache.InnerProductCache``.

    Returns:
        ``{"dir": str | None, "hits": int, "computed": int, "rejected": int}``: products read from
        the cache and computed (per module, pairs of distinct contents), and entries found but
        refused (a MAC that does not verify, a malformed or non-finite value) and computed again.
    """
    return {
        "dir": None if cache.directory is None else str(cache.directory),
        "hits": cache.stats.hits,
        "computed": cache.stats.computed,
        "rejected": cache.stats.rejected,
    }


def lock_json(lock: Any, *, written: bool) -> dict[str, Any] | None:
    """The lock file of a merge: ``{"file", "locked", "written"}``, or None without ``--lock``.

    Args:
        lock: a ``pipeline.LockState`` or None.
        written: whether the merge (re)wrote it.
    """
    if lock is None:
        return None
    return {"file": str(lock.path), "locked": lock.locked, "written": written}


def similarity_csv(result: Any) -> str:
    """Every group's matrix in long format, one row per ordered pair (diagonal included).

    Args:
        result: a ``similarity.SimilarityResult``.

    Returns:
        CSV text with header ``group,client_i,client_j,similarity``, groups in result order, then
        i, then j; similarities written with ``repr(float)`` so they read back exactly.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "client_i", "client_j", "similarity"])
    for name, group in result.groups.items():
        for i, row in enumerate(group.similarity.to(torch.float64).tolist()):
            for j, value in enumerate(row):
                writer.writerow([name, result.clients[i], result.clients[j], repr(float(value))])
    return buffer.getvalue()


def write_heatmap(result: Any, path: Path) -> None:
    """Draw the similarity matrices as heatmaps and write the image atomically.

    One panel per group on a grid sharing one colour scale: a diverging map centred on 0, over
    -1..1, or over 0..1 (its upper half) when no similarity is negative. Cells carry their values
    when there are at most ``ANNOTATE_MAX_CLIENTS`` clients and ``ANNOTATE_MAX_PANELS`` groups.
    Re-runs write byte-identical files.

    Args:
        result: a ``similarity.SimilarityResult``.
        path: the image to write; its suffix picks the format (.png, .pdf or .svg).

    Raises:
        OutputError: unknown format, missing directory, or the path is a directory.
    """
    _save_figure(lambda: _heatmap_figure(result), path)


def write_matrices(result: Any, path: Path) -> None:
    """Write every group's K × K similarity (float64) to a safetensors file, atomically.

    One tensor per group, named as the group; the metadata holds ``clients`` (a JSON list, the rows'
    and columns' order), ``granularity`` and ``similarity`` (the method, JSON). It is what a machine
    reads at 10 000 clients, where the same matrix as JSON text would be 2 GB and take a minute.

    Raises:
        OutputError: the path is a directory or its directory does not exist.
    """
    from safetensors.torch import save_file

    path = Path(path)
    check_matrix_path(path)
    tensors = {name: group.similarity.to(torch.float64).contiguous() for name, group in result.groups.items()}
    metadata = {
        "creator": "fedbip",
        "clients": json.dumps(list(result.clients)),
        "granularity": result.granularity,
        "similarity": json.dumps(result.method),
    }
    try:
        _replace_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    except OSError as exc:
        raise OutputError(f"cannot write the matrices: {exc.strerror}", where=str(path)) from None


def write_accuracy_plot(curves: dict[str, dict[int, float]], path: Path) -> None:
    """Plot mean personalized test accuracy per round, one line per strategy, atomically.

    Args:
        curves: strategy -> {round: mean accuracy}.
        path: the image to write (.png, .pdf or .svg).
    """

    def draw() -> Figure:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 4.2), dpi=100, layout="constrained")
        axis = figure.subplots()
        for strategy, curve in curves.items():
            axis.plot(list(curve), list(curve.values()), marker="o", markersize=3, label=strategy)
        axis.set_xlabel("round")
        axis.set_ylabel("mean personalized test accuracy")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.suptitle("fedbip simulate: accuracy per round")
        return figure

    _save_figure(draw, path)


def _save_figure(draw: Callable[[], Figure], path: Path) -> None:
    """Check ``path``, draw, and write the figure atomically with deterministic metadata."""
    path = Path(path)
    check_image_path(path)
    image_format = path.suffix.lower().lstrip(".")
    figure = draw()

    def save(temporary: Path) -> None:
        import matplotlib

        # svg ids are random unless salted.
        with matplotlib.rc_context({"svg.hashsalt": "fedbip"}):
            figure.savefig(temporary, format=image_format, dpi=150, metadata=_DETERMINISTIC_METADATA[image_format])

    _replace_atomically(path, save)


def check_image_path(path: Path) -> None:
    """OutputError unless ``path`` names an image fedbip can write (.png, .pdf or .svg) where it can be written."""
    if Path(path).suffix.lower().lstrip(".") not in _DETERMINISTIC_METADATA:
        valid = ", ".join(f".{name}" for name in _DETERMINISTIC_METADATA)
        raise OutputError(f"unknown image format {Path(path).suffix!r}", where=str(path), hint=f"name a {valid} file")
    _check_output_path(Path(path), "name an image file")


def check_matrix_path(path: Path) -> None:
    """OutputError unless the matrix file ``path`` can be written."""
    _check_output_path(Path(path), "name a .safetensors file")


def _check_output_path(path: Path, hint: str) -> None:
    """OutputError unless ``path`` can be written: not a directory, in a directory that exists, and
    nothing there or a file fedbip wrote (its metadata names fedbip): a user's file is never replaced."""
    if path.is_dir():
        raise OutputError("is a directory", where=str(path), hint=hint)
    if not path.parent.is_dir():
        raise OutputError("directory does not exist", where=str(path), hint="create it first")
    if (path.exists() or path.is_symlink()) and not _marked(path):
        raise OutputError(
            "a file fedbip did not write is there: it is never replaced",
            where=str(path),
            hint="fedbip replaces only a file it wrote: name another file, or move this one away",
        )


def _marked(path: Path) -> bool:
    """Whether the regular file ``path`` carries fedbip's mark near its start or its end."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(_MARK_SPAN)
            handle.seek(max(0, path.stat().st_size - _MARK_SPAN))
            tail = handle.read(_MARK_SPAN)
    except OSError:
        return False
    return MARK in head or MARK in tail


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a hidden temporary file in ``path``'s directory, then rename it to ``path``: the
    rename is atomic, so a crash leaves no half-written file under the real name."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _matrix_table(clients: list[str], matrix: torch.Tensor, title: str, neighbours: int) -> Table:
    # Columns are numbered like the rows: long names then cost no width beyond the name column.
    table = Table(title=title, caption="columns are the clients numbered in #", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("client", overflow="ellipsis", max_width=NAME_WIDTH)
    for i in range(len(clients)):
        table.add_column(str(i), justify="right")
    table.add_column("nearest")
    clients = [shown(c) for c in clients]
    rows = zip(clients, matrix.to(torch.float64).tolist(), nearest_neighbours(matrix, neighbours))
    for i, (name, row, near) in enumerate(rows):
        nearest = ", ".join(f"{_shorten(clients[j], NAME_WIDTH)} {_format_value(v)}" for j, v in near)
        cells = [_value_cell(value, diagonal=(i == j)) for j, value in enumerate(row)]
        table.add_row(str(i), name, *cells, nearest)
    return table


def _groups_table(result: Any) -> Table:
    table = Table(title="Per group (clients by number)", title_justify="left")
    table.add_column("group", overflow="fold")
    table.add_column("modules", justify="right")
    table.add_column("suggested clusters")
    for name, group in result.groups.items():
        clusters = suggest_clusters(group.similarity)
        text = (
            "one cluster"
            if len(clusters) <= 1
            else "  ".join("{" + ", ".join(map(str, cluster)) + "}" for cluster in clusters)
        )
        table.add_row(name, str(len(group.modules)), text)
    return table


def _clusters_line(clients: list[str], clusters: list[list[int]]) -> Text:
    line = Text("Suggested clusters: ", style="bold")
    if len(clusters) <= 1:
        line.append("none; no split of the clients is clearly better than one cluster", style="not bold")
        return line
    line.append("  ".join("{" + ", ".join(clients[i] for i in cluster) + "}" for cluster in clusters), style="not bold")
    return line


def _format_value(value: float) -> str:
    # A tiny negative value would show as "-0.00" and read as a sign that means something.
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def _value_cell(value: float, *, diagonal: bool) -> Text:
    text = _format_value(value)
    if diagonal:
        return Text(text, style="dim")
    if value >= 0.5:
        style = "bold green"
    elif value >= 0.2:
        style = "green"
    elif value <= -0.2:
        style = "bold red"
    elif value < 0 and text != "0.00":
        style = "red"
    else:
        style = ""
    return Text(text, style=style)


def _shorten(name: str, width: int, *, keep_tail: bool = False) -> str:
    if len(name) <= width:
        return name
    return "…" + name[-(width - 1) :] if keep_tail else name[: width - 1] + "…"


def _heatmap_figure(result: Any) -> Figure:
    # Figure without pyplot: no global backend switch, no figure registry; savefig renders png
    # through Agg.
    import matplotlib
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    clients = [_shorten(name, NAME_WIDTH) for name in result.clients]
    groups = list(result.groups.items())
    if not groups:
        raise ValueError("similarity result has no groups")
    matrices = [group.similarity.to(torch.float64).numpy() for _, group in groups]
    k = len(clients)
    diverging = matplotlib.colormaps["RdBu_r"]
    if min(float(m.min()) for m in matrices) >= -1e-9:
        colormap, low = ListedColormap(diverging(np.linspace(0.5, 1.0, 256))), 0.0
    else:
        colormap, low = diverging, -1.0
    columns = math.ceil(math.sqrt(len(groups)))
    rows = math.ceil(len(groups) / columns)
    annotate = k <= ANNOTATE_MAX_CLIENTS and len(groups) <= ANNOTATE_MAX_PANELS
    # Inches per cell: room for "-0.00" at 7 pt when annotated, else for an 8 pt tick label.
    panel = max(2.4, (0.42 if annotate else 0.2) * k + 1.2)
    figure = Figure(figsize=(columns * panel + 1.6, rows * panel + 0.9), dpi=100, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for index, ((name, group), matrix) in enumerate(zip(groups, matrices)):
        axis = axes[index]
        image = axis.imshow(matrix, cmap=colormap, vmin=low, vmax=1.0, interpolation="nearest")
        if result.granularity != "model":
            title = f"{_shorten(name, GROUP_WIDTH, keep_tail=True)} ({len(group.modules)})"
            axis.set_title(title, fontsize=9)
        axis.set_xticks(range(k))
        axis.set_yticks(range(k))
        # Names only on the outer panels; inner ones keep bare ticks to stay legible.
        bottom = index + columns >= len(groups)
        axis.set_xticklabels(clients if bottom else [], rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        axis.set_yticklabels(clients if index % columns == 0 else [], fontsize=8)
        if annotate:
            for (i, j), value in np.ndenumerate(matrix):
                axis.text(
                    j,
                    i,
                    _format_value(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if abs(value) > 0.6 else "black",
                )
    for axis in axes[len(groups) :]:
        axis.set_visible(False)
    colorbar = figure.colorbar(image, ax=axes[: len(groups)].tolist(), shrink=0.8 if rows > 1 else 1.0)
    colorbar.set_label("cosine similarity")
    if result.granularity == "model":
        figure.suptitle("Task-vector cosine similarity (whole model)")
    else:
        figure.suptitle(
            f"Task-vector cosine similarity per {result.granularity} "
            f"({len(groups)} groups; panel titles give the number of modules)"
        )
    return figure


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def plan_table(plan: dict[str, Any], out: Path) -> RenderableType:
    """The dry-run plan: one row per client, the totals in the caption; then the base checked against,
    with the whole commit a Hub base resolved to."""
    table = _full_plan_table(plan, out) if plan.get("kind") == "full" else _lora_plan_table(plan, out)
    base = plan.get("base")
    if not base:
        return table
    commit = f" at commit {base['revision']}" if base["revision"] else ""
    return Group(table, Text(f"checked against the base {base['source']}{commit}"))


def _lora_plan_table(plan: dict[str, Any], out: Path) -> Table:
    """The dry-run plan of adapters: one row per client, the totals in the caption."""
    table = Table(
        title=f"merge plan → {out}",
        caption=(
            f"{plan['modules']} modules in {len(plan['groups'])} {plan['granularity']} group(s); "
            f"combine {plan['combine']}"
            + (f" at rank {plan['rank']}" if plan["rank"] else "")
            + f"; about {_size(plan['output_bytes'])} to write"
        ),
    )
    for column in ("client", "source", "modules", "ranks"):
        table.add_column(column)
    for client in plan["clients"]:
        source = client["source"] + (f" @ {client['revision'][:12]}" if client["revision"] else "")
        table.add_row(
            shown(client["name"]), shown(source), str(client["modules"]), ", ".join(map(str, client["ranks"]))
        )
    return table


def _full_plan_table(plan: dict[str, Any], out: Path) -> Table:
    """The dry-run plan of full checkpoints: one row per client, what is written in the caption."""
    written = (
        f"one checkpoint per client in {plan['shards']} shard(s)"
        if plan["output"] == "checkpoint"
        else f"one adapter per client on {plan['lora_modules']} linear layers at rank {plan['rank']}"
    )
    table = Table(
        title=f"merge plan → {out}",
        caption=(
            f"{plan['tensors']} tensors ({plan['task_tensors']} with a task vector) in {len(plan['groups'])} "
            f"{plan['granularity']} group(s); {written}; about {_size(plan['output_bytes'])} to write"
        ),
    )
    for column in ("client", "source", "tensors", "weight files"):
        table.add_column(column)
    for client in plan["clients"]:
        source = client["source"] + (f" @ {client['revision'][:12]}" if client["revision"] else "")
        table.add_row(shown(client["name"]), shown(source), str(client["tensors"]), str(client["files"]))
    return table


def merge_summary(result: Any) -> dict[str, Any]:
    """The ``merge --json`` document: where outputs went, weights and energy per client."""
    clients = result.similarity.clients
    summary_energy = {}
    for client in clients:
        low, mean = energy_range(result.energy[client])
        summary_energy[client] = {"min": low, "mean": mean}
    return {
        "out": str(result.out),
        "kind": result.manifest["kind"],
        "output": result.manifest.get("output", "lora"),
        "clients": clients,
        "granularity": result.similarity.granularity,
        "similarity": result.similarity.method,
        "covers": result.similarity.covers,
        "combine": result.manifest["combine"],
        "rank": result.manifest["rank"],
        "weights": {name: [[float(x) for x in row] for row in w.tolist()] for name, w in result.weights.items()},
        "energy_kept": summary_energy,
        "outputs": result.manifest["outputs"],
        "defence": result.manifest["defence"],
        "manifest": str(result.out / "fedbip-manifest.json"),
    }


def merge_table(result: Any, top: int = 3) -> Table:
    """One row per client: its largest weights (averaged over groups) and the energy kept."""
    names = result.similarity.clients
    clients = [shown(c) for c in names]
    mean_weights = sum(result.weights.values()) / len(result.weights)
    written = "checkpoints" if result.manifest.get("output") == "checkpoint" else "adapters"
    table = Table(
        title=f"personalized {written} written to {result.out}",
        caption=(
            f"granularity {result.similarity.granularity} ({len(result.weights)} group(s)); combine "
            f"{result.manifest['combine']}"
            + (f" at rank {result.rank}" if result.manifest["rank"] else "")
            + (f"\n{covers_line(result.similarity.covers)}" if covers_line(result.similarity.covers) else "")
        ),
    )
    table.add_column("client")
    table.add_column("largest weights" + (" (mean over groups)" if len(result.weights) > 1 else ""))
    table.add_column("energy kept (min / mean)", justify="right")
    for i, client in enumerate(clients):
        row = mean_weights[i]
        order = sorted(range(len(clients)), key=lambda j: (-float(row[j]), j))[:top]
        text = ", ".join(f"{clients[j]} {float(row[j]):.2f}" for j in order if row[j] > 0)
        low, mean = energy_range(result.energy[names[i]])
        energy = "n/a" if low is None else f"{low:.4f} / {mean:.4f}"
        table.add_row(client, text, energy)
    return table


def simulation_table(summary: dict[str, Any], out: Path) -> Table:
    """Final personalized accuracy per strategy (mean, worst client), ARI and time split."""
    table = Table(
        title=f"fedbip simulate → {out}", caption="accuracy: each client's personalized model on its own test split"
    )
    for column in ("strategy", "mean acc", "worst acc", "ARI", "train s", "eval s", "server s", *COST_COLUMNS):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name, entry in summary["strategies"].items():
        ari = entry.get("ari")
        seconds = entry["seconds"]
        table.add_row(
            name,
            f"{entry['mean_accuracy']:.4f}",
            f"{entry['worst_accuracy']:.4f}",
            "n/a" if ari is None else f"{ari:.2f}",
            f"{seconds['train']:.1f}",
            f"{seconds['eval']:.1f}",
            f"{seconds['server']:.2f}",
            *cost_cells(entry),
        )
    return table
