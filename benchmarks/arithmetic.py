"""The arithmetic floor: the floating-point operations the exact algorithm cannot avoid, and the machine's
GEMM rate to do them at.

``merge_flops(wl)`` counts, per module of ``n = K·r`` stacked LoRA columns (K clients of rank r), of
shape d_out × d_in, and with ``p = min(n, d)`` the width of each side's shared basis:

- the exact similarity's stacked Grams, one per side: the n(n+1)/2 inner products of length d, n²·d
  flops per side (the factor-space cosines need every pair);
- each output client's factors from the shared basis, Q (d × p) times its p × R core factor, per side:
  2·d·p·R flops per client and side (R the output rank, the largest input rank);
- each client's top-R subspace of its p × p core: at least one product with R vectors, 2·p²·R flops.

Forming the cores (P times the clients' pieces) depends on the weights' sparsity and the SVD's
iterations on the solver, so both are left out: the count is a lower bound of fedbip's work, not its
work. ``similarity_flops`` is the Grams alone. ``python benchmarks/arithmetic.py SPEC.json RESULT.json``
(a child process of ``bench.py``, with torch's default threads) measures the float64 and float32 GEMM
rates: the best of several products of two square matrices of ``size``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def merge_flops(clients: int, rank: int, shapes: list[tuple[int, int]], output_rank: int | None = None) -> float:
    """The lower bound above, summed over modules of ``shapes`` (out, in)."""
    width = output_rank or rank
    total = 0.0
    for out_dim, in_dim in shapes:
        n = clients * rank
        total += similarity_module(n, out_dim, in_dim)
        for side in (out_dim, in_dim):
            p = min(n, side)
            total += clients * 2.0 * side * p * width
        total += clients * 2.0 * min(n, out_dim) * min(n, in_dim) * width
    return total


def similarity_module(n: int, out_dim: int, in_dim: int) -> float:
    return float(n) * n * (out_dim + in_dim)


def similarity_flops(clients: int, rank: int, shapes: list[tuple[int, int]]) -> float:
    return sum(similarity_module(clients * rank, o, i) for o, i in shapes)


def gemm_rates(size: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of ``size`` × ``size`` matrix products in float64 and float32 (best of ``repeats``)."""
    import torch

    rates = {}
    for dtype in (torch.float64, torch.float32):
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, dtype=dtype, generator=generator)
        b = torch.randn(size, size, dtype=dtype, generator=generator)
        a @ b  # warm up
        best = min(_timed_product(a, b) for _ in range(repeats))
        rates[str(dtype).removeprefix("torch.")] = 2.0 * size**3 / best / 1e9
    return rates


def _timed_product(a: Any, b: Any) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    Path(result_path).write_text(json.dumps(gemm_rates(spec["size"]), indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
