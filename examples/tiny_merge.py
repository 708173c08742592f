"""A tiny end-to-end merge with nothing but an installed fedbip: three random LoRA adapters of one
small linear model, merged with `fedbip merge`, the output checked to exist and load.

Used by `make dist-check` in a fresh virtualenv (torch and the wheel only); runs anywhere:

    python examples/tiny_merge.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODULES = {"layers.0.q_proj": (8, 6), "layers.1.q_proj": (8, 6)}  # (out, in)


def adapter(directory: Path, seed: int) -> None:
    """A PEFT LoRA adapter (rank 2) written by hand: adapter_config.json and adapter_model.safetensors."""
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True)
    tensors = {}
    for module, (n_out, n_in) in MODULES.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, n_in, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, 2, generator=generator)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))


def main() -> None:
    fedbip = Path(sys.executable).with_name("fedbip")
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        for i in range(3):
            adapter(root / "adapters" / f"client{i}", seed=i)
        command = [str(fedbip), "merge", str(root / "adapters"), "--out", str(root / "merged"), "--json"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        summary = json.loads(result.stdout)
        assert summary["clients"] == ["client0", "client1", "client2"], summary
        for client in summary["clients"]:
            tensors = load_file(str(root / "merged" / client / "adapter_model.safetensors"))
            assert all(torch.isfinite(t).all() for t in tensors.values())
        print(f"merged {len(summary['clients'])} adapters with {fedbip}: ok")


if __name__ == "__main__":
    main()
