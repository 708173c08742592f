"""The error of ``fedbip inspect-similarity --format json`` against an 80-bit reference, and its symmetry.

Adapters are made by peft (``tests/peftkinds.py``: ``get_peft_model`` on a real tiny model, seeded
factors, ``save_pretrained`` in float32): K clients of one LoRA config (query and value, r = 8,
lora_alpha 16) that share a component, one of them anti-similar. Two models: the tiny BERT of the tests
(hidden 32) and a wider one (hidden 384, 2 layers).

The reference is written here, independent of fedbip: every ΔW = s · B @ A formed in ``np.longdouble``
(80-bit extended precision on x86: 64-bit mantissa) from the stored float32 factors, flattened over all
modules, and the cosine of each pair computed in that precision. The command runs in a child process,
``python -m fedbip_cli ... --no-cache`` in the current directory: the fedbip measured is the checkout the
script is run from (or the one on ``PYTHONPATH``, else the installed one); its path is printed first.

Printed per model: the largest |S_json − S_ref| over all pairs (beside it, as a baseline from this run, the
same error of a plain dense cosine in float64), the largest off-diagonal |S_ij − S_ji|,
the number of pairs i < j with S_ij != S_ji (the JSON matrix should be exactly symmetric), and whether the
diagonal is exactly 1.

Usage:
    .venv/bin/python benchmarks/similarity_error.py [--clients 8] [--rank 8] [--workdir DIR] [--write-docs]

``--write-docs`` also writes the results into docs/performance.md (its ``similarity-error`` section).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from peft import LoraConfig
from safetensors import safe_open
from transformers import BertConfig, BertForSequenceClassification

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from factories import PREFIX  # noqa: E402
from peftkinds import FAMILIES, Family, make_clients  # noqa: E402

from benchmarks.docgen import write_generated  # noqa: E402
from benchmarks.lora_files import raw_factors, scale, weights_file  # noqa: E402

MODELS = {
    "bert-h32": FAMILIES["bert"],
    "bert-h384": Family(
        "bert-h384",
        BertForSequenceClassification,
        BertConfig(
            hidden_size=384,
            num_hidden_layers=2,
            num_attention_heads=6,
            intermediate_size=1536,
            vocab_size=100,
            max_position_embeddings=64,
            num_labels=3,
        ),
    ),
}


def dense_deltas(adapter: Path, dtype: type[np.floating]) -> np.ndarray:
    """All of an adapter's ΔW = s · B @ A in ``dtype``, flattened and concatenated in module order."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    with safe_open(str(weights_file(adapter)), framework="np") as f:
        suffix = ".lora_A.weight"
        modules = sorted(k.removeprefix(PREFIX).removesuffix(suffix) for k in f.keys() if k.endswith(suffix))
    parts = []
    for module in modules:
        a, b = (t.numpy().astype(dtype) for t in raw_factors(adapter, module))
        parts.append((dtype(scale(config, module)) * (b @ a)).ravel())
    return np.concatenate(parts)


def dense_similarity(adapters: list[Path], dtype: type[np.floating]) -> np.ndarray:
    """The clients' cosine similarity, every step in ``dtype``."""
    x = np.stack([dense_deltas(a, dtype) for a in adapters])
    gram = x @ x.T
    norms = np.sqrt(np.diagonal(gram))
    return gram / np.outer(norms, norms)


def fedbip_similarity(adapters: Path) -> tuple[list[str], np.ndarray]:
    """The clients and the model-granularity similarity printed by ``inspect-similarity --format json``."""
    done = subprocess.run(
        [sys.executable, "-m", "fedbip_cli", "inspect-similarity", str(adapters), "--format", "json", "--no-cache"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"inspect-similarity failed ({done.returncode}): {done.stderr.strip()}")
    report = json.loads(done.stdout)
    return report["clients"], np.array(report["groups"]["model"]["similarity"], dtype=np.float64)


def measure(name: str, family: Family, workdir: Path, clients: int, rank: int) -> dict[str, object]:
    base = family.save_base(workdir / name / "base")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], lora_dropout=0.0)
    made = make_clients(family, base, config, workdir / name / "adapters", clients=clients, reference=False)
    names, got = fedbip_similarity(workdir / name / "adapters")
    order = [names.index(c.name) for c in made]
    got = got[np.ix_(order, order)]
    want = dense_similarity([c.path for c in made], np.longdouble)
    baseline = dense_similarity([c.path for c in made], np.float64)
    upper = np.triu_indices(len(made), k=1)
    return {
        "model": name,
        "clients": len(made),
        "max_abs_error": float(np.max(np.abs(got.astype(np.longdouble) - want))),
        "dense_float64_error": float(np.max(np.abs(baseline.astype(np.longdouble) - want))),
        "max_asymmetry": float(np.max(np.abs(got - got.T))),
        "asymmetric_pairs": int(np.count_nonzero(got[upper] != got.T[upper])),
        "pairs": len(upper[0]),
        "diagonal_exactly_1": bool(np.all(np.diagonal(got) == 1.0)),
    }


def summary(results: list[dict[str, object]], rank: int) -> str:
    """The results as a markdown table with what was measured."""
    lines = [
        f"`inspect-similarity --format json` on float32 adapters made by peft (query and value, r = {rank}), "
        "against an 80-bit (`np.longdouble`) reference, beside a plain float64 dense cosine of the same inputs:",
        "",
        "| model | clients | max \\|S − S_ref\\| | dense float64 cosine | pairs with S_ij ≠ S_ji | diagonal exactly 1 |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['clients']} | {r['max_abs_error']:.1e} | {r['dense_float64_error']:.1e} "
            f"| {r['asymmetric_pairs']} of {r['pairs']} | {'yes' if r['diagonal_exactly_1'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--write-docs", action="store_true", help="also write the results into docs/performance.md")
    args = parser.parse_args()
    where = subprocess.run(
        [sys.executable, "-c", "import fedbip_cli; print(fedbip_cli.__file__)"], capture_output=True, text=True
    ).stdout.strip()
    print(f"fedbip measured: {where}")
    print(f"np.longdouble: {np.finfo(np.longdouble).nmant + 1}-bit mantissa, eps {np.finfo(np.longdouble).eps:.3g}")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        for name, family in MODELS.items():
            result = measure(name, family, workdir, args.clients, args.rank)
            results.append(result)
            print(
                f"{result['model']:10s} K={result['clients']}  max |S - S_ref| = {result['max_abs_error']:.3e} "
                f"(dense float64: {result['dense_float64_error']:.3e})  "
                f"max |S_ij - S_ji| = {result['max_asymmetry']:.3e}  "
                f"asymmetric pairs: {result['asymmetric_pairs']} of {result['pairs']}  "
                f"diagonal exactly 1: {result['diagonal_exactly_1']}"
            )
    if args.write_docs:
        write_generated(ROOT / "docs" / "performance.md", "similarity-error", summary(results, args.rank))


if __name__ == "__main__":
    main()
