#!/usr/bin/env bash
# End-to-end fedbip demo on CPU, a few minutes on 2 cores, fully offline:
#   1. a short federated simulation with no communication (`--strategy local`): six clients
#      fine-tune real LoRA adapters of all-MiniLM-L6-v2, each with its classification head inside
#      (peft's modules_to_save), on their own slices of BBC News, two clients in each of three task
#      groups whose labels conflict; the run saves the base it started from (encoder and initial
#      head) in $OUT/sim/base and the true groups in $OUT/sim/groups.json; skipped when $OUT/sim
#      exists unless FORCE=1;
#   2. show how similar the clients' task vectors are, globally and layer by layer (+ heatmap), the
#      clusters they suggest, and how well those recover the true task groups (adjusted Rand index;
#      the head's group is where the conflicting label semantics show);
#   3. write one personalized, layer-wise merged adapter per client;
#   4. load one merged adapter back with peft onto the saved base.
# Usage: [OUT=demo-out] [FORCE=1] bash examples/demo.sh   (or: make demo)
set -euo pipefail

OUT=${OUT:-demo-out}
export HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
SECONDS=0

step() { printf '\n== [%3ss] %s\n' "$SECONDS" "$*"; }

if [[ -f "$OUT/sim/summary.json" && -f "$OUT/sim/base/config.json" && "${FORCE:-0}" != 1 ]]; then
    step "reusing the client adapters in $OUT/sim/adapters (FORCE=1 retrains)"
else
    step "fine-tuning six client adapters (fedbip simulate --strategy local) into $OUT/sim"
    # --partition tasks --alpha 1 --examples-per-client 0: the demo keeps the label-permutation
    # tasks and its ample split (~800 sentences per client), in which each client's head learns its
    # group's labelling well enough for the clusters to show.
    fedbip simulate --strategy local --clients 6 --groups 3 --rounds 8 --local-steps 5 --lr 3e-3 \
        --partition tasks --alpha 1 --examples-per-client 0 --eval-every 4 --out "$OUT/sim" --overwrite
fi
ADAPTERS="$OUT/sim/adapters"
BASE="$OUT/sim/base"

step "global similarity of the clients' task vectors (LoRA and head, against $BASE)"
fedbip inspect-similarity "$ADAPTERS" --base "$BASE"

step "layer-wise similarity, heatmap in $OUT/similarity.png"
fedbip inspect-similarity "$ADAPTERS" --base "$BASE" --layerwise --heatmap "$OUT/similarity.png"

step "do the suggested clusters recover the true task groups ($OUT/sim/groups.json)?"
fedbip inspect-similarity "$ADAPTERS" --base "$BASE" --format json >"$OUT/similarity.json"
fedbip inspect-similarity "$ADAPTERS" --base "$BASE" --layerwise --format json >"$OUT/similarity-layerwise.json"
python - "$OUT/sim/groups.json" "$OUT/similarity.json" "$OUT/similarity-layerwise.json" <<'PY'
import json
import sys

import torch

from fedbip_cli.clustering import adjusted_rand_index, suggest_clusters

groups, whole, layerwise = (json.load(open(path)) for path in sys.argv[1:])
clients = whole["clients"]


def show(clusters: list[list[str]]) -> str:
    return "  ".join("{" + ", ".join(cluster) + "}" for cluster in clusters) if len(clusters) > 1 else "one cluster"


def ari(clusters: list[list[str]]) -> float:
    found = {client: number for number, cluster in enumerate(clusters) for client in cluster}
    return adjusted_rand_index([found[c] for c in clients], [groups[c] for c in clients])


print("true groups:", show([[c for c in clients if groups[c] == g] for g in sorted(set(groups.values()))]))
print("adjusted Rand index of the suggested clusters against them (1 = the true groups, ~0 = chance):")
rows = {"whole model": whole["clusters"]}
for name, group in layerwise["groups"].items():
    rows[name] = [[clients[i] for i in c] for c in suggest_clusters(torch.tensor(group["similarity"]))]
for name, clusters in rows.items():
    print(f"  {name:22} {ari(clusters):5.2f}  {show(clusters)}")
PY

step "personalized layer-wise merge (FedBip-L) into $OUT/merged"
fedbip merge "$ADAPTERS" --base "$BASE" --layerwise --out "$OUT/merged" --overwrite

step "loading a merged adapter with peft onto $BASE"
python -W ignore::FutureWarning - "$OUT/merged" "$BASE" <<'PY'
import sys
from pathlib import Path

import transformers
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForSequenceClassification

transformers.utils.logging.disable_progress_bar()

merged, base = Path(sys.argv[1]), Path(sys.argv[2])
first = sorted(p for p in merged.iterdir() if (p / "adapter_config.json").is_file())[0]
model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), first)
n_lora = sum(isinstance(m, LoraLayer) for m in model.modules())
saved = sorted(set(model.peft_config["default"].modules_to_save or []))
print(f"loaded {first} with peft: {n_lora} LoRA modules, rank {model.peft_config['default'].r}, saved modules {saved}")
PY

step "done: demo took ${SECONDS}s"
