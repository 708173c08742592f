"""The worst errors of fedbip against peft's dense float64 reference, for every EXACT case of tests/test_kinds.py.

The cases, their adapters and the reference are the tests' own (``tests/test_kinds.py`` and
``tests/peftkinds.py``, imported, not copied): tiny real models, peft-made adapters of each kind, and each
client's reference delta ``merge_and_unload() − base`` in float64. fedbip is reached through its CLI as the
tests reach it (typer's runner, in process), with a private inner-product cache.

Printed per case:

- sim err: max |S_fedbip − S_ref| of ``inspect-similarity --format json --base BASE`` against the dense
  float64 cosine of the reference deltas;
- cat rel err: ``merge --combine cat --dtype float32``, the max over clients and parameters of
  ‖out_delta − Σ_j P_ij ref_j‖_F / ‖Σ_j P_ij ref_j‖_F, where out_delta is peft's ``merge_and_unload()`` of
  the loaded output minus the base and P is max(S_ref, 0) normalised per row (a parameter not expected to
  change: over the largest expected norm);
- svd excess (lora and dora only): ``merge --combine svd --rank 2``, the max over clients and modules whose
  output is LoRA of error / optimal − 1, the optimal being the rank-2 Eckart–Young error.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kinds_error.py               # print the table
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kinds_error.py --write-docs  # and write it into the docs

``--write-docs`` writes the table into docs/adapter-kinds.md and its worst values into docs/performance.md
and README.md (their ``kinds-error`` sections).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from peftkinds import FAMILIES, base_state, make_clients, merged_delta  # noqa: E402
from test_kinds import (  # noqa: E402
    CASES,
    SVD_RANK,
    Built,
    Case,
    combined,
    cosine,
    group_similarity,
    inspect_json,
    loaded_adapter,
    merge,
    ordered,
    paper_weights,
    relative_errors,
)

from benchmarks.docgen import write_generated  # noqa: E402

SVD_CASES = ("lora", "dora")
DTYPES = ("float32", "float16", "bfloat16")  # the output dtypes whose rounding docs/merge.md states


def kinds(case: Case) -> str:
    """The family and what each distinct config adds to plain LoRA."""
    configs = case.configs()
    described = []
    for config in configs if isinstance(configs, list) else [configs]:
        flags = [
            flag
            for flag, on in (
                ("rslora", config.use_rslora),
                ("patterns", bool(config.rank_pattern or config.alpha_pattern)),
                ("conv1d", config.fan_in_fan_out),
                ("dora", config.use_dora),
                ("lora_bias", config.lora_bias),
                (f"bias={config.bias}", config.bias != "none"),
                ("seq_cls", config.task_type == "SEQ_CLS"),
                ("embedding", any("embed" in t for t in config.target_modules)),
                (f"save={'+'.join(config.modules_to_save or [])}", bool(config.modules_to_save)),
            )
            if on
        ]
        text = "lora" + "".join(f"+{f}" for f in flags)
        if text not in described:
            described.append(text)
    return f"{case.family}: {', '.join(described)}"


def frobenius_errors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter ‖got − expected‖_F / ‖expected‖_F (not expected to change: over the largest ‖expected‖_F)."""
    return relative_errors(got, expected, size=lambda t: float(t.norm()))


def measure(case: Case, base: Path, work: Path) -> tuple[float, float, float | None]:
    """(similarity error, cat merge relative error, svd excess or None) of one EXACT case."""
    family = FAMILIES[case.family]
    adapters = work / case.id / "adapters"
    clients = make_clients(family, base, case.configs(), adapters, clients=case.clients, anti=case.anti)
    inputs = Built(base, adapters, clients)
    deltas = [c.delta for c in clients]
    similarity = cosine(deltas)
    weights = paper_weights(similarity)
    state = base_state(family, base)

    report = inspect_json(inputs)
    got = group_similarity(report, "model", ordered(report["clients"], clients))
    similarity_error = float((got - similarity).abs().max())

    out = work / case.id / "cat"
    merge(inputs, out, "--combine", "cat")
    cat_error = 0.0
    for i, client in enumerate(clients):
        expected = combined(weights[i], deltas)
        have = merged_delta(loaded_adapter(case, inputs, out / client.name), state)
        cat_error = max(cat_error, *frobenius_errors(have, expected).values())

    if case.id not in SVD_CASES:
        return similarity_error, cat_error, None
    out = work / case.id / "svd"
    merge(inputs, out, "--combine", "svd", "--rank", str(SVD_RANK))
    low_rank = {f"{m}.weight" for c in clients for m in c.lora_modules}
    excess = -float("inf")
    for i, client in enumerate(clients):
        expected = combined(weights[i], deltas)
        have = merged_delta(loaded_adapter(case, inputs, out / client.name), state)
        for name in sorted(low_rank & set(expected)):
            want = expected[name]
            optimal = float(torch.linalg.svdvals(want)[SVD_RANK:].norm())
            error = float((want - have.get(name, torch.zeros_like(want))).norm())
            excess = max(excess, error / optimal - 1)
    return similarity_error, cat_error, excess


def dtype_errors(case: Case, base: Path, work: Path) -> dict[str, float]:
    """Per output dtype, the worst relative Frobenius error of a ``cat`` merge (exact but for its storage)
    loaded back in peft, against Σ_j P_ij ΔW_j in float64."""
    family = FAMILIES[case.family]
    adapters = work / f"{case.id}-dtypes" / "adapters"
    clients = make_clients(family, base, case.configs(), adapters, clients=case.clients, anti=case.anti)
    inputs = Built(base, adapters, clients)
    deltas = [c.delta for c in clients]
    weights = paper_weights(cosine(deltas))
    state = base_state(family, base)
    errors = {}
    for dtype in DTYPES:
        out = work / f"{case.id}-dtypes" / dtype
        merge(inputs, out, "--combine", "cat", "--dtype", dtype)
        errors[dtype] = max(
            max(
                frobenius_errors(
                    merged_delta(loaded_adapter(case, inputs, out / c.name), state), combined(w, deltas)
                ).values()
            )
            for c, w in zip(clients, weights, strict=True)
        )
    return errors


Row = tuple[Case, float, float, float | None]


def table(rows: list[Row]) -> str:
    """The markdown table of every case."""
    lines = [
        "| case | kinds (what each client's config adds to LoRA) | similarity error | `cat` merge, relative "
        "| `svd --rank 2`, over optimal |",
        "|---|---|---:|---:|---:|",
    ]
    for case, sim, cat, svd in rows:
        lines.append(f"| {case.id} | {kinds(case)} | {sim:.1e} | {cat:.1e} | {'–' if svd is None else f'{svd:.1e}'} |")
    return "\n".join(lines)


def worst(rows: list[Row]) -> tuple[float, float, float]:
    """The worst similarity error, cat merge error and svd excess over every case."""
    return (
        max(sim for _, sim, _, _ in rows),
        max(cat for _, _, cat, _ in rows),
        max(svd for _, _, _, svd in rows if svd is not None),
    )


def write_docs(rows: list[Row], dtypes: dict[str, float]) -> None:
    """The table into docs/adapter-kinds.md; its worst values into docs/performance.md and README.md; the
    rounding of each output dtype into docs/merge.md."""
    rounding = ", ".join(f"`--dtype {d}` {e:.1e}" for d, e in dtypes.items())
    write_generated(
        ROOT / "docs" / "merge.md",
        "dtype-error",
        f"Measured on peft-made LoRA adapters (`cat` merges loaded back in peft, worst relative Frobenius "
        f"error against Σ_j P_ij ΔW_j in float64): {rounding}.",
    )
    write_generated(ROOT / "docs" / "adapter-kinds.md", "kinds-error", table(rows))
    sim, cat, svd = worst(rows)
    names = ", ".join(case.id for case, *_ in rows)
    summary = (
        f"On adapters of every kind made by peft ({len(rows)} cases: {names}), against the dense float64 "
        f"`merge_and_unload() − base`: similarity within **{sim:.1e}**; `cat --dtype float32` merges loaded "
        f"back in peft within **{cat:.1e}** relative Frobenius (float32 rounding); `svd --rank 2` within "
        f"**{svd:.1e}** of the optimal rank-2 error. [Every case](adapter-kinds.md#measured-exactness)."
    )
    write_generated(ROOT / "docs" / "performance.md", "kinds-error", summary)
    bullet = (
        f"- **Exact**: similarity of peft-made adapters of every kind within {sim:.1e} of the dense float64 "
        f"cosine of `merge_and_unload() − base`; `cat` merges within float32 rounding (≤ {cat:.1e} relative); "
        f"`svd` within {svd:.1e} of the optimal rank-R error ([exactness](docs/performance.md))."
    )
    write_generated(ROOT / "README.md", "kinds-error", bullet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-docs", action="store_true", help="also write the results into the docs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices, as in the tests
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.simplefilter("ignore")  # peft's and transformers' notes on the tiny models
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"torch {torch.__version__}; fedbip from {ROOT}")
    print()
    header = f"{'case':<24} {'kinds':<58} {'sim err':>9} {'cat rel err':>11} {'svd excess':>10}"
    print(header)
    print("-" * len(header))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fedbip-kinds-") as tmp:
        work = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(work / "xdg-cache")  # no entries read from or left in the user's cache
        bases = {name: family.save_base(work / name / "base") for name, family in FAMILIES.items()}
        for case in CASES:
            if case.refused:
                continue
            sim, cat, svd = measure(case, bases[case.family], work)
            rows.append((case, sim, cat, svd))
            svd_text = "-" if svd is None else f"{svd:.1e}"
            print(f"{case.id:<24} {kinds(case):<58} {sim:>9.1e} {cat:>11.1e} {svd_text:>10}", flush=True)
        dtypes = dtype_errors(next(c for c in CASES if c.id == "lora"), bases["bert"], work)
    print()
    print("cat merge of the lora case, by output dtype: " + ", ".join(f"{d} {e:.1e}" for d, e in dtypes.items()))
    if args.write_docs:
        write_docs(rows, dtypes)


if __name__ == "__main__":
    main()
