"""``make demo``, recorded: run ``examples/demo.sh`` afresh and write what it printed into the docs.

The demo fine-tunes six clients of three conflicting task groups, inspects their adapters and
merges them. This script runs it from scratch (``FORCE=1``, in a temporary ``OUT``), then writes

- ``docs/simulate.md``'s ``demo`` section: the demo's wall time, the adjusted Rand index of each
  suggested clustering against the true groups, and the transcript (the long layer-wise tables cut);
- the README's ``demo`` section: the same indices in one sentence.

    .venv/bin/python benchmarks/demo_record.py [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docgen import ROOT, load_note, write_generated  # noqa: E402

STEP = re.compile(r"^== \[\s*(\d+)s\] (.*)$")
ARI_ROW = re.compile(r"^  (\S.*?)\s+(-?\d\.\d\d)  (.*)$")
BLOCK = re.compile(r"\.\d+$")  # a transformer block's layer group, e.g. bert.encoder.layer.3
CUT = "layer-wise similarity"  # the step whose tables are cut from the transcript


def run_demo(out: Path) -> str:
    """The demo's standard output, run afresh into ``out`` with this interpreter's environment."""
    env = dict(os.environ, OUT=str(out), FORCE="1", COLUMNS="120", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"the demo failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout.replace(str(out), "demo-out")


def parse(transcript: str) -> tuple[int, dict[str, tuple[float, str]]]:
    """The demo's wall seconds (its last step) and each clustering's ARI and clusters."""
    seconds = [int(m.group(1)) for line in transcript.splitlines() if (m := STEP.match(line))]
    aris: dict[str, tuple[float, str]] = {}
    lines = transcript.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("adjusted Rand index"))
    for line in lines[start + 1 :]:
        match = ARI_ROW.match(line)
        if match is None:
            break
        aris[match.group(1)] = (float(match.group(2)), match.group(3))
    if not seconds or not aris:
        raise SystemExit("the demo's output has no steps or no ARI table: has examples/demo.sh changed?")
    return seconds[-1], aris


def shortened(transcript: str) -> str:
    """The transcript with the layer-wise step's tables replaced by one line saying so."""
    kept: list[str] = []
    cut, cutting = 0, False
    for line in transcript.rstrip().splitlines():
        step = STEP.match(line)
        if step is not None:
            if cutting:
                kept += [f"[... {cut} lines: the layer-wise similarity tables, one per layer group ...]", ""]
            cut, cutting = 0, CUT in step.group(2)
            kept.append(line)
        elif cutting:
            cut += 1
        else:
            kept.append(line.rstrip())
    return "\n".join(kept)


def ari_sentence(aris: dict[str, tuple[float, str]]) -> str:
    """One sentence: the heads', the whole model's and the LoRA blocks' ARI."""
    blocks = [value for name, (value, _) in aris.items() if BLOCK.search(name)]
    parts = [f"{name} {value:.2f}" for name, (value, _) in aris.items() if not BLOCK.search(name)]
    if blocks:
        low, high = min(blocks), max(blocks)
        parts.append(f"the {len(blocks)} LoRA blocks {low:.2f}" + (f" to {high:.2f}" if high != low else ""))
    return (
        "By adjusted Rand index against the true task groups (1 = found exactly, about 0 = chance), "
        f"its suggested clusters score: {', '.join(parts)}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help="write the README's and docs/simulate.md's sections")
    args = parser.parse_args()
    note = load_note()
    with tempfile.TemporaryDirectory() as tmp:
        transcript = run_demo(Path(tmp) / "demo-out")
    seconds, aris = parse(transcript)
    sentence = ari_sentence(aris)
    print(transcript)
    print(sentence)
    if not args.write_docs:
        return
    table = "\n".join(
        ["| clustering | ARI | suggested clusters |", "|---|---|---|"]
        + [f"| {name} | {value:.2f} | {clusters} |" for name, (value, clusters) in aris.items()]
    )
    page = (
        f"`make demo` ran in **{seconds} s** (its own clock, from a fresh `FORCE=1` run; installing "
        f"`.venv` adds a few minutes once). {sentence}\n\n{table}\n\n"
        f"What it printed:\n\n```\n{shortened(transcript)}\n```"
    )
    write_generated(ROOT / "docs" / "simulate.md", "demo", page, note)
    write_generated(ROOT / "README.md", "demo", sentence, note)


if __name__ == "__main__":
    main()
