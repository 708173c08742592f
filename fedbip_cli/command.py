"""The ``fedbip merge`` command line that reproduces a merge, written from its options.

It is rebuilt from what the merge actually used, never copied from ``sys.argv``: every option is
spelled out (defaults included), ``--rank`` is the rank used, the device is the one resolved, Hub
SOURCES are pinned to the commits they resolved to, local ones and @lists are as given (never made
absolute: the command is published in cards). ``--out`` is left as
``OUT`` so that the command, and whatever records it, stays the same bytes wherever the merge was
written.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from fedbip_cli.sources import ResolvedSource, pinned_spec

OUT_PLACEHOLDER = "OUT"


def pinned_sources(resolved: Sequence[tuple[str, Sequence[ResolvedSource]]]) -> list[str]:
    """The SOURCES, in the same order, as given: a Hub reference pinned at the commit its clients came
    from; a local path or an ``@list`` as written (the manifest's inputs and the lock file record what
    each resolved to)."""
    return [pinned_spec(spec, group[0].revision if group else None) for spec, group in resolved]


def merge_command(
    sources: Sequence[str], options: dict[str, object], *, base: str | None, rank: int | None, device: str
) -> str:
    """``fedbip merge`` with every option of a merge, shell-quoted.

    Args:
        sources: pinned SOURCES (``pinned_sources``).
        options: ``MergeOptions.as_dict()``; for full checkpoints with ``to_lora`` and
            ``max_shard_size`` too (``--combine`` does not apply to them). Its ``similarity``
            (``{"method": ...}``, exact when absent) gives ``--similarity`` and the sketch's options.
        base: the pinned ``--base``, if any.
        rank: the rank used by ``svd`` (None otherwise).
        device: the device the merge ran on (``cpu`` or ``cuda``).
    """
    words = ["fedbip", "merge", *sources, "--out", OUT_PLACEHOLDER]
    if base is not None:
        words += ["--base", base]
    words += ["--granularity", str(options["granularity"]), "--weighting", str(options["weighting"])]
    words += ["--negative", str(options["negative"]), "--temperature", repr(options["temperature"])]
    if options["top_k"] is not None:
        words += ["--top-k", str(options["top_k"])]
    if "to_lora" in options:  # full checkpoints: merged whole into shards, or written as adapters
        if options["to_lora"] is not None:
            words += ["--to-lora", str(options["to_lora"])]
        else:
            words += ["--max-shard-size", str(options["max_shard_size"])]
    else:
        words += ["--combine", str(options["combine"]), "--dtype", str(options.get("dtype", "auto"))]
    if options.get("heads") is not None:
        words += ["--heads", str(options["heads"])]
    if options.get("clip_norm") is not None:
        words += ["--clip-norm", str(options["clip_norm"])]
    if rank is not None:
        words += ["--rank", str(rank)]
    words += ["--device", device]
    method = options.get("similarity") or {"method": "exact"}
    words += ["--similarity", str(method["method"])]
    if method["method"] == "sketch":
        words += ["--sketch-dim", str(method["dim"]), "--sketch-seed", str(method["seed"])]
    return shlex.join(words)
