"""The peft path, run as its own process: one ``add_weighted_adapter(..., "svd")`` call per client.

``python benchmarks/peft_path.py SPEC.json RESULT.json``. On a one-block base built with
transformers (random init, float32, the workload's widths), every client's adapter, trimmed to the
one measured block-0 module, is loaded under its own name; then for each measured client i,
``add_weighted_adapter(adapters=all K, weights=P_i, combination_type="svd", svd_rank=R)``, saved
with ``save_pretrained`` and deleted again.

What peft computes (``tuners/lora/model.py``, peft 0.21): ``get_delta_weight`` of every adapter
(s_j·B_j@A_j, in float32 here), ``task_arithmetic`` = Σ_j w_j ΔW_j, then
``torch.linalg.svd(full_matrices=True)`` of that dense matrix, keeping R triplets: B = U_R·diag(σ_R),
A = V_Rᵀ, with ``lora_alpha = r = R`` (scale 1). So weights = P_i give M_i = Σ_j P_ij ΔW_j.

Timed apart, so the harness can scale them: building the base, trimming the adapters (neither is
part of the peft path), loading the K adapters (per module, shared by all clients), and each
client's add + save + delete.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START = time.perf_counter()
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from benchmarks.lora_files import CONFIG_NAME, PREFIX, raw_factors, weights_file  # noqa: E402

IMPORT_S = time.perf_counter() - START


def base_model(family: str, hidden: int, intermediate: int) -> torch.nn.Module:
    """A one-block base of the workload's widths (Llama causal LM, or a MiniLM-shaped BertModel)."""
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        heads = max(1, hidden // 128)
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=1,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=32,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config)
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=max(1, hidden // 32),
        vocab_size=32,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False)


def trim(source: Path, target: Path, module: str, suffix: str) -> None:
    """A copy of ``source`` holding ``module`` alone (so that loading it costs what one module costs)."""
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / CONFIG_NAME).read_text(encoding="utf-8"))
    config["target_modules"] = [suffix]
    (target / CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
    a, b = raw_factors(source, module)
    save_file(
        {f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b},
        str(weights_file(target)),
        metadata={"format": "pt"},
    )


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    shutil.rmtree(work, ignore_errors=True)
    clients, module = spec["clients"], spec["module"]
    suffix = module.rsplit(".", 1)[-1]

    start = time.perf_counter()
    trimmed = work / "trimmed"
    for client in clients:
        trim(Path(spec["clients_dir"]) / client, trimmed / client, module, suffix)
    trim_s = time.perf_counter() - start

    start = time.perf_counter()
    base = base_model(spec["family"], spec["hidden"], spec["intermediate"])
    base_s = time.perf_counter() - start

    start = time.perf_counter()
    model = PeftModel.from_pretrained(base, str(trimmed / clients[0]), adapter_name=clients[0])
    for client in clients[1:]:
        model.load_adapter(str(trimmed / client), adapter_name=client)
    model.to(spec["device"])
    load_s = time.perf_counter() - start

    out = work / "merged"
    per_client = {}
    for client, row in zip(spec["measured"], spec["weights"]):
        name = f"merged-{client}"
        start = time.perf_counter()
        model.add_weighted_adapter(
            adapters=clients, weights=row, adapter_name=name, combination_type="svd", svd_rank=spec["rank"]
        )
        added = time.perf_counter()
        model.save_pretrained(str(out), selected_adapters=[name])
        model.delete_adapter(name)
        per_client[client] = {"add_s": added - start, "save_s": time.perf_counter() - added, "adapter": str(out / name)}
    shutil.rmtree(trimmed, ignore_errors=True)
    result = {
        "import_s": IMPORT_S,
        "trim_s": trim_s,
        "base_s": base_s,
        "load_s": load_s,
        "clients": per_client,
        "threads": torch.get_num_threads(),
    }
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
