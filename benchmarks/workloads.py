"""The benchmark workloads: their shapes, and seeded PEFT adapters with planted clusters on disk.

Each client is its cluster's centre plus noise, factor by factor: A_i = A_c + σ·N_A, B_i = B_c + σ·N_B
(σ = 0.6 of the centre's scale), so two clients of one cluster have task-vector cosine ≈ 1/(1+σ²)² ≈
0.54 and two of different clusters ≈ 0: the similarity has real structure, as among community
adapters trained on related tasks. Adapters are written as peft writes them (fp16, keys
``base_model.model.<module>.lora_A.weight``, ``lora_alpha = 2r``) with ``tests/factories``, into
``<work>/<workload>[-quick]-<seed>/clients/``, and reused while ``workload.json`` matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

GENERATOR_VERSION = 1
NOISE = 0.6  # client noise relative to the centre's scale
B_SCALE = 0.02  # typical magnitude of trained lora_B entries (lora_A ~ 1/sqrt(in), like its init)

LLAMA_PATHS = {
    **{t: "model.layers.{b}.self_attn." + t for t in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{t: "model.layers.{b}.mlp." + t for t in ("gate_proj", "up_proj", "down_proj")},
}
BERT_PATHS = {t: "encoder.layer.{b}.attention.self." + t for t in ("query", "key", "value")}


@dataclass(frozen=True)
class Workload:
    """One benchmark workload: what is generated and what is checked.

    ``family`` names the module layout and the peft base (``llama``: Llama-2 names, ``bert``:
    MiniLM names). ``check_targets`` are block-0 modules, one per distinct shape, on which the peft
    path and the dense reference are measured for the first ``check_clients`` clients and scaled
    to the whole workload (``check_layerwise``: the layer-wise merge's output is checked as well, at
    the price of one more SVD per pair); ``similarity_check`` clients get a dense reference cosine.
    """

    name: str
    family: str
    clients: int
    blocks: int
    targets: tuple[str, ...]
    rank: int
    hidden: int
    intermediate: int = 0
    clusters: int = 4
    similarity_only: bool = False
    check_targets: tuple[str, ...] = ()
    check_clients: int = 1
    similarity_check: int = 4
    check_layerwise: bool = True
    peft: bool = True
    sketch: bool = False
    quick: bool = False
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}-quick" if self.quick else self.name

    def shape(self, target: str) -> tuple[int, int]:
        """(out_features, in_features) of a target module."""
        if target in ("gate_proj", "up_proj"):
            return self.intermediate, self.hidden
        if target == "down_proj":
            return self.hidden, self.intermediate
        return self.hidden, self.hidden

    def module(self, target: str, block: int) -> str:
        paths = LLAMA_PATHS if self.family == "llama" else BERT_PATHS
        return paths[target].format(b=block)

    def modules(self) -> dict[str, tuple[int, int]]:
        """Every module name, block by block, with its (out, in) shape."""
        return {self.module(t, b): self.shape(t) for b in range(self.blocks) for t in self.targets}

    def check_modules(self) -> dict[str, tuple[int, int]]:
        return {self.module(t, 0): self.shape(t) for t in self.check_targets}

    def per_client_bytes(self, rank: int) -> int:
        """Bytes of one client's fp16 factors at ``rank`` (tensor data only)."""
        return sum(rank * (o + i) * 2 for o, i in self.modules().values())

    def generation_spec(self, seed: int) -> dict:
        """What determines the generated files: a cached workload is reused only when this matches."""
        fields = ("family", "clients", "blocks", "targets", "rank", "hidden", "intermediate", "clusters")
        return {"generator": GENERATOR_VERSION, "seed": seed, **{f: asdict(self)[f] for f in fields}}


LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_ALL = (*LLAMA_ATTN, "gate_proj", "up_proj", "down_proj")
MINILM = ("query", "value")

WORKLOADS = {
    "7b-attn": Workload(
        "7b-attn",
        "llama",
        32,
        32,
        LLAMA_ATTN,
        16,
        4096,
        11008,
        clusters=4,
        check_targets=("q_proj",),
        check_clients=2,
        similarity_check=4,
    ),
    "7b-all-linear": Workload(
        "7b-all-linear",
        "llama",
        8,
        32,
        LLAMA_ALL,
        16,
        4096,
        11008,
        clusters=4,
        check_targets=("q_proj", "gate_proj", "down_proj"),
        check_clients=1,
        similarity_check=4,
    ),
    "many-clients": Workload(
        "many-clients",
        "bert",
        1000,
        6,
        MINILM,
        8,
        384,
        clusters=8,
        check_targets=("query",),
        check_clients=5,
        similarity_check=50,
    ),
    "huge-k": Workload(
        "huge-k",
        "bert",
        10_000,
        6,
        MINILM,
        8,
        384,
        clusters=8,
        similarity_only=True,
        peft=False,
        sketch=True,
        similarity_check=50,
    ),
    # Not an issue workload: the end-to-end test's (3 clients, 2 blocks, width 32).
    "tiny": Workload(
        "tiny",
        "llama",
        3,
        2,
        ("q_proj", "v_proj"),
        4,
        32,
        64,
        clusters=2,
        check_targets=("q_proj",),
        check_clients=3,
        similarity_check=3,
    ),
}
DEFAULT_WORKLOADS = ("7b-attn", "7b-all-linear", "many-clients", "huge-k")

# QUICK sizes: what each workload keeps of the shape (widths, ranks and clients per
# cluster are the real ones; blocks and clients are fewer), so that a QUICK run takes a few minutes.
QUICK = {
    "7b-attn": dict(
        blocks=1, check_clients=1, check_layerwise=False, note="1 of 32 blocks; layer-wise output not checked"
    ),
    "7b-all-linear": dict(
        blocks=1,
        check_targets=(),
        peft=False,
        similarity_check=2,
        note="1 of 32 blocks; no peft or dense merge (7b-attn has them at width 4096)",
    ),
    "many-clients": dict(clients=200, check_clients=2, note="200 of 1000 clients"),
    "huge-k": dict(clients=1000, note="1000 of 10 000 clients"),
    "tiny": {},
}
# Per-contender time limits unless --timeout gives one for all: fedbip's commands are what is under
# test (a slow engine is recorded as 'timeout'), the peft path and dense reference are sized to finish.
TIMEOUTS = {"full": (900.0, 900.0), "quick": (30.0, 300.0)}  # (fedbip, peft and dense)


def workload(name: str, *, quick: bool = False) -> Workload:
    """The workload called ``name``, at QUICK size when ``quick``."""
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    base = WORKLOADS[name]
    return replace(base, quick=True, **QUICK[name]) if quick else base


def client_names(count: int) -> list[str]:
    return [f"client-{i:05d}" for i in range(count)]


def _seed(*parts: object) -> int:
    """A 63-bit seed from any parts: each tensor has its own stream, independent of loop order."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def _factors(seed: int, out_features: int, in_features: int, rank: int, scale: float):
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, in_features, generator=g) * (scale / math.sqrt(in_features))
    b = torch.randn(out_features, rank, generator=g) * (scale * B_SCALE)
    return a, b


def write_clients(wl: Workload, seed: int, directory: Path) -> None:
    """Write every client's adapter: cluster centre (client index mod clusters) plus noise."""
    import torch
    from factories import write_lora_adapter

    modules = wl.modules()
    for index, client in enumerate(client_names(wl.clients)):
        cluster = index % wl.clusters
        factors = {}
        for m, (name, (out_f, in_f)) in enumerate(modules.items()):
            a_c, b_c = _factors(_seed(seed, "centre", cluster, m), out_f, in_f, wl.rank, 1.0)
            a_n, b_n = _factors(_seed(seed, "noise", index, m), out_f, in_f, wl.rank, NOISE)
            factors[name] = (a_c + a_n, b_c + b_n)
        write_lora_adapter(
            directory / client,
            factors,
            r=wl.rank,
            lora_alpha=2 * wl.rank,
            target_modules=wl.targets,
            dtype=torch.float16,
        )


@dataclass(frozen=True)
class Generated:
    root: Path
    clients: Path
    seconds: float
    reused: bool
    input_bytes: int


def ensure(wl: Workload, seed: int, work_dir: Path, *, regenerate: bool = False) -> Generated:
    """The workload's adapters on disk, generated now unless a matching cached copy exists."""
    root = work_dir / f"{wl.key}-{seed}"
    clients, marker = root / "clients", root / "workload.json"
    spec = wl.generation_spec(seed)
    start = time.perf_counter()
    reused = not regenerate and marker.exists() and json.loads(marker.read_text()) == spec and clients.is_dir()
    if not reused:
        marker.unlink(missing_ok=True)
        shutil.rmtree(clients, ignore_errors=True)
        tmp = root / "clients.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_clients(wl, seed, tmp)
        tmp.rename(clients)
        marker.write_text(json.dumps(spec, indent=2) + "\n")
    size = sum(f.stat().st_size for f in clients.rglob("*") if f.is_file())
    return Generated(root, clients, time.perf_counter() - start, reused, size)
