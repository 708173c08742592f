"""The dense torch reference, run as its own process: timed, and the yardstick of every error.

``python benchmarks/reference.py SPEC.json RESULT.json``. For each checked module (block 0) it
materializes every client's ΔW_j = s_j B_j A_j in float64, adds P_ij ΔW_j into M_i for each checked
client i and weight variant (global, layer-wise), and takes ``torch.linalg.svd(M_i,
full_matrices=False)``; the optimal rank-R truncation M_R and its energy Σ_{k≤R} σ_k² / Σ σ_k² follow.
Materializing, summing and the SVD are timed apart (``global`` weights), for the harness to scale.

Each contender's output X for a checked (client, module), read from disk (ΔW = s·B@A with its own
config's scale), gets: energy kept 1 - ‖M - X‖²/‖M‖² (= the optimal energy for X = M_R) and the
relative error ‖X - M_R‖/‖M_R‖ against the optimal truncation.

The similarity reference: for a few clients, the cosine of their whole task vectors from dense ΔW
of every module (flattened, float64), compared with the rows of each similarity contender's JSON
output, read as a stream (a 10 000-client matrix is gigabytes of JSON: only the needed rows are parsed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from benchmarks.lora_files import delta  # noqa: E402

CHUNK = 1 << 20


class Stream:
    """Forward-only reading of a large text file up to and through tokens."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, encoding="utf-8")
        self.buf = ""

    def through(self, token: str, *, keep: bool = False) -> str:
        """Consume the text up to and including ``token``; return it when ``keep``."""
        pieces: list[str] = []
        while (i := self.buf.find(token)) < 0:
            cut = max(0, len(self.buf) - len(token) + 1)  # a token may straddle two chunks
            if keep:
                pieces.append(self.buf[:cut])
            chunk = self.file.read(CHUNK)
            if not chunk:
                raise ValueError(f"{token!r} not found")
            self.buf = self.buf[cut:] + chunk
        end = i + len(token)
        pieces.append(self.buf[:end] if keep else "")
        self.buf = self.buf[end:]
        return "".join(pieces)

    def array(self) -> list:
        """The next flat JSON array (no nested brackets)."""
        self.through("[")
        return json.loads("[" + self.through("]", keep=True))

    def close(self) -> None:
        self.file.close()


def similarity_rows(path: Path, names: list[str]) -> torch.Tensor:
    """The (n, n) block of ``names`` in the first group's similarity of an inspect JSON output, or
    of the safetensors file ``inspect-similarity --matrix`` wrote."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            clients = json.loads(f.metadata()["clients"])
            index = [clients.index(n) for n in names]
            rows = f.get_slice(next(iter(f.keys())))[: max(index) + 1]
        return rows[index][:, index].to(torch.float64)
    stream = Stream(path)
    try:
        stream.through('"clients"')
        clients = stream.array()
        index = [clients.index(n) for n in names]
        stream.through('"groups"')
        stream.through('"similarity"')
        stream.through("[")
        rows = {}
        for r in range(max(index) + 1):
            row = stream.array()
            if r in index:
                rows[r] = [row[j] for j in index]
    finally:
        stream.close()
    return torch.tensor([rows[r] for r in index], dtype=torch.float64)


def similarity_reference(clients_dir: Path, names: list[str], modules: list[str], device: str) -> torch.Tensor:
    """Cosine of the whole task vectors of ``names``, from dense flattened ΔW of every module."""
    gram = torch.zeros(len(names), len(names), dtype=torch.float64, device=device)
    for module in modules:
        stacked = torch.stack([delta(clients_dir / n, module, device).flatten() for n in names])
        gram += stacked @ stacked.T
    norms = gram.diagonal().sqrt()
    return (gram / norms[:, None] / norms[None, :]).cpu()


def merge_reference(spec: dict, module: str, outputs: list[dict]) -> tuple[dict, list[dict]]:
    """Timings of the dense merge of ``module`` for the checked clients, and each output's errors."""
    clients_dir, device, rank = Path(spec["clients_dir"]), spec["device"], spec["rank"]
    variants = spec["weights"]  # variant -> module -> checked client -> row over all clients
    checked = spec["check_clients"]
    acc = {(v, c): None for v in variants for c in checked}
    materialize_s, sum_s = 0.0, {v: 0.0 for v in variants}
    for j, client in enumerate(spec["clients"]):
        start = time.perf_counter()
        d = delta(clients_dir / client, module, device)
        materialize_s += time.perf_counter() - start
        for v in variants:
            start = time.perf_counter()
            for c in checked:
                w = variants[v][module][c][j]
                if w != 0.0:
                    acc[(v, c)] = w * d if acc[(v, c)] is None else acc[(v, c)].add_(d, alpha=w)
            sum_s[v] += time.perf_counter() - start
    timing: dict = {"materialize_s": materialize_s, "clients": {}}
    errors = []
    for (v, c), m in acc.items():
        start = time.perf_counter()
        u, sigma, vh = torch.linalg.svd(m, full_matrices=False)
        svd_s = time.perf_counter() - start
        if v == "global":
            timing["clients"][c] = {"sum_s": sum_s[v] / len(checked), "svd_s": svd_s}
        m_r = (u[:, :rank] * sigma[:rank]) @ vh[:rank]
        total = float((sigma**2).sum())
        energy_opt = float((sigma[:rank] ** 2).sum()) / total
        for out in outputs:
            if out["variant"] != v or out["client"] != c:
                continue
            x = delta(Path(out["dir"]), module, device)
            errors.append(
                {
                    "contender": out["contender"],
                    "client": c,
                    "module": module,
                    "energy_opt": energy_opt,
                    "energy": 1.0 - float(torch.linalg.matrix_norm(m - x) ** 2) / total,
                    "rel_err": float(torch.linalg.matrix_norm(x - m_r) / torch.linalg.matrix_norm(m_r)),
                }
            )
    return timing, errors


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"threads": torch.get_num_threads(), "dense": {}, "errors": [], "similarity": {}}
    for module in spec["check_modules"]:
        outputs = [o for o in spec["outputs"] if o["module"] == module]
        result["dense"][module], errors = merge_reference(spec, module, outputs)
        result["errors"] += errors
    sim = spec.get("similarity")
    if sim and sim["inspect"]:
        start = time.perf_counter()
        names = sim["clients"]
        reference = similarity_reference(Path(spec["clients_dir"]), names, spec["modules"], spec["device"])
        result["similarity_reference_s"] = time.perf_counter() - start
        for contender, path in sim["inspect"].items():
            try:
                got = similarity_rows(Path(path), names)
            except (
                ValueError,
                KeyError,
                IndexError,
            ) as exc:  # an output of another shape must not cost the other checks
                result["similarity"][contender] = {
                    "unreadable": f"{type(exc).__name__}: {exc}"[:200],
                    "clients": len(names),
                }
                continue
            result["similarity"][contender] = {
                "max_abs_err": float((got - reference).abs().max()),
                "clients": len(names),
            }
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
