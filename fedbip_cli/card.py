"""Model cards: ``OUT/<client>/README.md``, the human-readable page of one merged adapter or checkpoint.

A card is rendered from the merge's manifest record alone, so it says nothing the manifest does not
and its bytes are as deterministic: no dates, no host names, no output path. The YAML front matter
is what the Hugging Face Hub reads (``library_name``, ``tags``, ``base_model`` when the base is a
Hub model). Full fine-tuned checkpoints get the same card with their own wording: what was written
(a checkpoint, or an adapter with ``--to-lora``), each input's weight files, and no truncation energy
for an exact merge.
"""

from __future__ import annotations

from typing import Any

import torch

from fedbip_cli.clustering import row_neighbours
from fedbip_cli.merge import energy_range
from fedbip_cli.sources import FULL, HUB_PREFIX, HubRef

CARD_NAME = "README.md"
NEIGHBOURS = 3
# A card lists at most this many weights per group: with 1000 clients the full row made every card 180 kB.
CARD_WEIGHTS = 20


def model_card(record: dict[str, Any], client: str, declared_base: str | None = None) -> str:
    """The model card of ``client``'s merged adapter (or, for full checkpoints, checkpoint or adapter).

    Args:
        record: the merge's manifest (``pipeline`` builds it; ``outputs`` is not read).
        client: one of ``record["clients"]``.
        declared_base: the base named in the client's ``adapter_config.json``, shown when the merge
            was not checked against a ``--base``.

    Returns:
        Markdown text ending with a newline.
    """
    index = record["clients"].index(client)
    versions = record["versions"]
    options = record["options"]
    full = record.get("kind") == FULL
    checkpoint = record.get("output") == "checkpoint"
    lines = [
        "---",
        "library_name: transformers" if checkpoint else "library_name: peft",
        *_base_model_metadata(record),
        "tags:",
        "- fedbip",
        "- full-fine-tuning" if full else "- lora",
        "- merge",
        "---",
        "",
        f"# {client}: personalized FedBip merge",
        "",
        f"Client `{client}`'s {_what(record)}, weighted by how similar they are to this one (FedBip, "
        f"arXiv 2509.12697). Written by fedbip {versions['fedbip']} (torch {versions['torch']}).",
        "",
        "## Base model",
        "",
        _base_line(record, declared_base),
        "",
        "## Sources",
        "",
        f"| client | source | revision | {'sha256 of the weight files' if full else 'sha256 of adapter_model.safetensors'} |",
        "|---|---|---|---|",
        *(
            f"| {i['name']} | `{i['source']}` | {_code(i['revision']) if i['revision'] else 'local'} | {_input_hashes(i)} |"
            for i in record["inputs"]
        ),
        "",
        "## Merge",
        "",
        f"- granularity: {record['granularity']} ({len(record['groups'])} group(s) with one weight matrix each)",
        f"- similarity: {_similarity_line(record.get('similarity', {'method': 'exact'}))}",
        f"- weighting: {options['weighting']}, negative similarities: {options['negative']}, "
        f"temperature: {options['temperature']!r}, top-k: {options['top_k'] or 'all clients'}",
        f"- combine: {record['combine']}" + (f" at rank {record['rank']}" if record["rank"] is not None else ""),
        f"- energy kept: {'all (the merge is exact)' if checkpoint else _energy_line(record['energy_kept'][client])}",
        *(
            [
                f"- share of the whole delta's energy in this adapter: {record['to_lora']['delta_energy_kept'][client]:.4f}"
            ]
            if full and not checkpoint
            else []
        ),
        "",
        f"## Weights of {client}",
        "",
        f"Non-zero weights P_ij of this client's row, largest first (the {CARD_WEIGHTS} largest per group; every weight is in `fedbip-manifest.json`).",
        "",
        "| group | weights |",
        "|---|---|",
        *(
            f"| {name} | {_weights_cell(record['clients'], group['weights'][index])} |"
            for name, group in record["groups"].items()
        ),
        "",
        "## Nearest neighbours",
        "",
        _neighbours_line(record, index),
        "",
        "## Reproduce",
        "",
        "```bash",
        record["command"],
        "```",
        "",
        f"With fedbip {versions['fedbip']} and torch {versions['torch']} on the same kind of device, "
        f"`OUT/{client}/` then holds this {'checkpoint' if checkpoint else 'adapter'} byte for byte "
        f"({_written(record)}; their sha256 are in `fedbip-manifest.json`). Hub sources are pinned to "
        "the commits merged here, so the command keeps working after their branches move.",
    ]
    return "\n".join(lines) + "\n"


def _what(record: dict[str, Any]) -> str:
    """What the card describes: the output and the sum over the clients' task vectors."""
    clients = len(record["clients"])
    if record.get("kind") != FULL:
        return f"personalized LoRA adapter: M = Σ_j P_ij ΔW_j over the task vectors of {clients} clients"
    over = f"over the task vectors ΔW_j = W_j − W_base of {clients} fine-tuned checkpoints"
    if record.get("output") == "checkpoint":
        return f"personalized checkpoint: W_base + Σ_j P_ij ΔW_j {over}"
    rank = record["to_lora"]["rank"]
    return f"rank-{rank} LoRA adapter of the personalized delta M = Σ_j P_ij ΔW_j {over} (randomized SVD of each linear layer's M)"


def _written(record: dict[str, Any]) -> str:
    """The files of one client's output that the command reproduces."""
    if record.get("output") == "checkpoint":
        return "its weights and the base's config files"
    return "`adapter_config.json` and `adapter_model.safetensors`"


def _input_hashes(entry: dict[str, Any]) -> str:
    """An input's sha256: of its adapter weights, or of each weight file of a full checkpoint."""
    if "sha256" in entry:
        return _code(entry["sha256"])
    return "<br>".join(f"{name} {_code(digest)}" for name, digest in entry["files"].items())


def _code(text: str) -> str:
    return f"`{text}`"


def _base_model_metadata(record: dict[str, Any]) -> list[str]:
    """``base_model: owner/repo`` for a Hub base (the Hub links the card to it), else nothing."""
    base = record["base"]
    if base is not None and base["source"].startswith(HUB_PREFIX):
        return [f"base_model: {HubRef.parse(base['source']).repo_id}"]
    return []


def _base_line(record: dict[str, Any], declared_base: str | None) -> str:
    base = record["base"]
    if base is not None:
        revision = f" at commit `{base['revision']}`" if base["revision"] else ""
        checked = "tensor" if record.get("kind") == FULL else "module"
        return f"`{base['source']}`{revision}; every {checked}'s name and shape were checked against it."
    if declared_base:
        return f"`{declared_base}`, as the adapters' configs declare it (not checked: no `--base` was given)."
    return "Not recorded (no `--base` was given and the adapters' configs name none)."


def _energy_line(energy: dict[str, float | None]) -> str:
    low, mean = energy_range(energy)
    if low is None or mean is None:
        return "unknown (the combine mode is not a truncation of the exact merge)"
    return f"min {low:.4f}, mean {mean:.4f} over {len(energy)} module(s) (Σ kept σ² / Σ σ²)"


def _similarity_line(method: dict[str, Any]) -> str:
    if method["method"] == "sketch":
        return f"sketched cosine ({method['dim']} x {method['dim']} numbers per module, seed {method['seed']}; approximate)"
    return "exact cosine of the task vectors"


def _weights_cell(clients: list[str], row: list[float]) -> str:
    order = sorted((j for j, w in enumerate(row) if w != 0.0), key=lambda j: (-row[j], j))
    cell = ", ".join(f"{clients[j]} {row[j]:.4f}" for j in order[:CARD_WEIGHTS])
    rest = order[CARD_WEIGHTS:]
    return cell + (f", and {len(rest)} more summing to {sum(row[j] for j in rest):.4f}" if rest else "")


def _neighbours_line(record: dict[str, Any], index: int) -> str:
    """Nearest clients by cosine similarity (the mean over groups when layer-wise)."""
    # Only this client's row of each group: the cards of K clients cost O(K²), not O(K³).
    rows = torch.tensor([group["similarity"][index] for group in record["groups"].values()], dtype=torch.float64)
    near = row_neighbours(rows.mean(dim=0).numpy(), index, NEIGHBOURS)
    if not near:
        return "None (a single client)."
    over = "" if rows.shape[0] == 1 else f" (mean cosine over the {rows.shape[0]} groups)"
    return (
        f"By cosine similarity of task vectors{over}: "
        + ", ".join(f"{record['clients'][j]} {value:.4f}" for j, value in near)
        + "."
    )
