"""Mutation testing of the core maths with cosmic-ray (``make mutate``; not part of ``make test``).

Each module below is mutated one small change at a time (a flipped operator, a changed number, a
dropped ``not``, a swapped comparison, ...), and for each mutant a small selection of the tests
that cover that module runs (stopping at the first failure): a mutant that no test notices
*survives* and shows a property no test pins. The mutants are applied to a copy of the package and
the tests under ``.mutate/work``, never to the working tree, so an interrupted run leaves the
checkout as it was. cosmic-ray lives in its own virtual environment (``.mutate/venv``, installed on
first use within a pinned range); the tests run with this Python.

Writes ``.mutate/report.md``: per module the mutants, killed (a test failed or timed out),
survived and incompetent (the mutant could not run), the kill rate, and every survivor's diff.

Usage:
    .venv/bin/python benchmarks/mutate.py [--modules weights,similarity] [--timeout 600] [--resume] [--jobs N]

``--resume`` keeps the last session of each module and its copy of the package, copies today's tests
in, and runs what it had not run and what survived it (a module changed since starts a new session).
``--jobs N`` tests N mutants at once, each shard of the pending mutants in its own copy of the code.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".mutate"
TOOL = "cosmic-ray>=8.4,<9"

ENGINE = "tests/test_engine.py::"
SIMILARITY_TESTS = [
    ENGINE + "test_similarity_matches_dense_reference",
    ENGINE + "test_missing_module_is_a_zero_delta",
    ENGINE + "test_zero_task_vector_is_refused",
    ENGINE + "test_refactoring_leaves_similarity_unchanged",
    ENGINE + "test_identical_adapters_have_similarity_one",
    ENGINE + "test_cosine_is_exactly_symmetric_even_from_an_asymmetric_gram",
    "tests/test_cache.py",
]
MERGE_TESTS = [
    ENGINE + "test_cat_merge_is_exact",
    ENGINE + "test_svd_at_full_rank_is_lossless",
    ENGINE + "test_svd_truncation_equals_dense_truncated_svd",
    ENGINE + "test_linear_merge_averages_factors",
    ENGINE + "test_linear_merge_with_unequal_ranks_raises",
    ENGINE + "test_zero_weight_clients_are_skipped",
    ENGINE + "test_top_k_one_merges_to_own_delta",
    ENGINE + "test_identical_clients_merge_to_their_delta",
    "tests/test_scale.py",
]
# Operators not applied. ``x | y`` appears in these modules only in type annotations, which
# ``from __future__ import annotations`` never evaluates: every mutant of it is equivalent. Replacing an
# arithmetic operator by a bitwise one or a shift raises at once on float tensors; left out for time.
EXCLUDED_OPERATORS = [
    r"core/ReplaceBinaryOperator_BitOr_.*",
    r"core/ReplaceBinaryOperator_.*_(BitOr|BitAnd|BitXor|LShift|RShift)$",
]

# Module -> the tests run against each of its mutants (after tests/test_properties.py, which always runs).
SELECTIONS: dict[str, list[str]] = {
    "weights": [
        ENGINE + "test_weight_rows_sum_to_one",
        ENGINE + "test_weights_hand_computed",
        ENGINE + "test_top_k_keeps_self_and_breaks_ties_to_lower_index",
        ENGINE + "test_keep_with_non_positive_row_sum_raises",
        ENGINE + "test_unknown_names_list_the_valid_ones",
        ENGINE + "test_invalid_numbers_are_usage_errors",
    ],
    "similarity": SIMILARITY_TESTS,
    "gram": SIMILARITY_TESTS,
    "merge": MERGE_TESTS,
    "parts": ["tests/test_kinds.py"],
    "taskvec": [*SIMILARITY_TESTS, ENGINE + "test_block_grouping_and_natural_order"],
    "clustering": ["tests/test_report.py"],
    "defence": ["tests/test_defence.py"],
}


@dataclass
class Outcome:
    """What the mutants of one module did."""

    module: str
    killed: int = 0
    timeouts: int = 0  # of the killed: the tests ran past --timeout
    survived: list[str] = field(default_factory=list)
    incompetent: int = 0
    skipped: int = 0  # by EXCLUDED_OPERATORS
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.killed + len(self.survived) + self.incompetent

    def rate(self) -> float:
        """Killed over the mutants that ran (incompetent ones never did)."""
        competent = self.killed + len(self.survived)
        return self.killed / competent if competent else 1.0


def tool_venv() -> Path:
    """cosmic-ray's own environment, created and filled on first use."""
    venv = STATE / "venv"
    if not (venv / "bin" / "cosmic-ray").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", TOOL], check=True)
    return venv / "bin"


def fresh_copy() -> Path:
    """The package, the tests and pyproject.toml copied to ``.mutate/work`` (mutants go there)."""
    work = STATE / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("fedbip_cli", "tests"):
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    return work


def test_command(module: str) -> str:
    """pytest over the module's selection, stopping at the first failure: the pure property tests
    first in a process of their own (they import little, and kill most mutants), then the rest."""
    pytest = f"{shlex.quote(sys.executable)} -m pytest -x -q -p no:cacheprovider --no-header"
    stages = [f"{pytest} tests/test_properties.py", f"{pytest} {' '.join(SELECTIONS[module])}"]
    return shlex.join(["sh", "-c", " && ".join(stages)])


def environment(work: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(work), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def write_config(work: Path, module: str, timeout: float) -> Path:
    """cosmic-ray's configuration for ``module``: its file, the per-mutant timeout, tests and filters."""
    config = work / f"{module}.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "fedbip_cli/{module}.py"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(test_command(module))}\n\n"
        '[cosmic-ray.distributor]\nname = "local"\n\n'
        f"[cosmic-ray.filters.operators-filter]\nexclude-operators = {json.dumps(EXCLUDED_OPERATORS)}\n"
    )
    return config


def start_session(bin_dir: Path, work: Path, module: str, timeout: float) -> Path:
    """A new session of every mutant of ``fedbip_cli/<module>.py``, after checking its tests pass unmutated."""
    env = environment(work)
    baseline = subprocess.run(test_command(module), shell=True, cwd=work, env=env, capture_output=True, text=True)
    if baseline.returncode != 0:
        raise SystemExit(f"{module}: the selected tests fail unmutated:\n{baseline.stdout[-2000:]}")
    config = write_config(work, module, timeout)
    session = work / f"{module}.sqlite"
    session.unlink(missing_ok=True)  # a session a stopped run began: its module may have changed since
    shutil.copy2(work / "fedbip_cli" / f"{module}.py", work / f"{module}.py.orig")  # what the mutants change
    subprocess.run([str(bin_dir / "cosmic-ray"), "init", str(config), str(session)], cwd=work, env=env, check=True)
    subprocess.run([str(bin_dir / "cr-filter-operators"), str(session), str(config)], cwd=work, env=env, check=True)
    return session


def resume_session(work: Path, module: str) -> Path | None:
    """The earlier session of ``module`` with its survivors pending again (to run against today's tests),
    and its copy of the module as it was (a run stopped mid-mutant leaves it changed); None when there is
    none, or the module changed since (the mutants' positions refer to the old one)."""
    session, original = work / f"{module}.sqlite", work / f"{module}.py.orig"
    if not session.exists() or not original.exists():
        return None
    if original.read_bytes() != (ROOT / "fedbip_cli" / f"{module}.py").read_bytes():
        return None
    shutil.copy2(original, work / "fedbip_cli" / f"{module}.py")
    gather(work, session)
    with sqlite3.connect(session) as db:
        # A timeout counts as a kill, but on a loaded machine a correct mutant's tests may just be slow.
        db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED' OR output = 'timeout'")
    return session


def shard(work: Path, session: Path, index: int, count: int) -> tuple[Path, Path]:
    """A copy of ``work`` (its package and tests) holding every ``count``-th pending mutant of ``session``."""
    copy = work.parent / f"{work.name}-{index}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("*.sqlite", "__pycache__"))
    part = copy / session.name
    shutil.copy2(session, part)
    with sqlite3.connect(part) as db:
        pending = [row[0] for row in db.execute("SELECT job_id FROM work_items ORDER BY job_id")]
        done = {row[0] for row in db.execute("SELECT job_id FROM work_results")}
        others = [(j,) for k, j in enumerate(j for j in pending if j not in done) if k % count != index]
        db.executemany("DELETE FROM mutation_specs WHERE job_id = ?", others)
        db.executemany("DELETE FROM work_items WHERE job_id = ?", others)
    return copy, part


def execute(bin_dir: Path, work: Path, session: Path, module: str, jobs: int) -> None:
    """Run the session's pending mutants in ``jobs`` copies at once and gather their results into it."""
    config = f"{module}.toml"
    parts = [shard(work, session, k, jobs) for k in range(jobs)]
    running = [
        subprocess.Popen([str(bin_dir / "cosmic-ray"), "exec", config, str(part)], cwd=copy, env=environment(copy))
        for copy, part in parts
    ]
    if any(process.wait() != 0 for process in running):
        raise SystemExit(f"{module}: cosmic-ray exec failed")
    gather(work, session)


def gather(work: Path, session: Path) -> None:
    """Results of the shards of ``session`` (also of a run that was stopped) into it; the shards removed."""
    with sqlite3.connect(session) as db:
        for part in sorted(work.parent.glob(f"{work.name}-*/{session.name}")):
            db.execute("ATTACH DATABASE ? AS part", (str(part),))
            db.execute("INSERT OR REPLACE INTO work_results SELECT * FROM part.work_results")
            db.commit()
            db.execute("DETACH DATABASE part")
            shutil.rmtree(part.parent)


def run_module(bin_dir: Path, work: Path, module: str, timeout: float, *, resume: bool, jobs: int) -> Outcome:
    """Every pending mutant of ``module`` against its selection; what each did (the session stays in ``work``)."""
    started = time.monotonic()
    session = resume_session(work, module) if resume else None
    if session is None:
        session = start_session(bin_dir, work, module, timeout)
    else:
        write_config(work, module, timeout)
    execute(bin_dir, work, session, module, jobs)
    dump = subprocess.run(
        [str(bin_dir / "cosmic-ray"), "dump", str(session)], cwd=work, check=True, capture_output=True, text=True
    )
    outcome = Outcome(module)
    for line in dump.stdout.splitlines():
        item, result = json.loads(line)
        if result is not None and result.get("worker_outcome") == "skipped":
            outcome.skipped += 1
        elif result is None or result.get("worker_outcome") != "normal" or result["test_outcome"] == "incompetent":
            outcome.incompetent += 1
        elif result["test_outcome"] == "survived":
            outcome.survived.append(result.get("diff") or json.dumps(item))
        else:
            outcome.killed += 1
            outcome.timeouts += (result.get("output") or "").strip() == "timeout"
    outcome.seconds = time.monotonic() - started
    return outcome


def report(outcomes: list[Outcome]) -> str:
    """A markdown table of the outcomes and every survivor's diff."""
    lines = [
        "| module | mutants run | killed (by a timeout) | survived | incompetent | skipped operators | kill rate | minutes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.module} | {o.total} | {o.killed} ({o.timeouts}) | {len(o.survived)} | {o.incompetent} | {o.skipped} "
            f"| {100 * o.rate():.1f}% | {o.seconds / 60:.0f} |"
        )
    for o in outcomes:
        for diff in o.survived:
            lines += ["", f"Survivor in {o.module}:", "```diff", diff.strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modules", default=",".join(SELECTIONS), help="comma-separated, from: " + ", ".join(SELECTIONS)
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's tests (a timeout kills)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the last session of each module: its pending mutants and, against today's tests, its survivors",
    )
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once, each in its own copy")
    args = parser.parse_args()
    modules = [m for m in args.modules.split(",") if m]
    unknown = sorted(set(modules) - set(SELECTIONS))
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(SELECTIONS)}")
    bin_dir = tool_venv()
    work = STATE / "work"
    if args.resume and work.is_dir():  # the package copy stays (the mutants' positions refer to it)
        shutil.rmtree(work / "tests", ignore_errors=True)
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        work = fresh_copy()
    outcomes = []
    for module in modules:
        outcomes.append(run_module(bin_dir, work, module, args.timeout, resume=args.resume, jobs=args.jobs))
        (STATE / "report.md").write_text(report(outcomes), encoding="utf-8")
        print(f"{module}: {outcomes[-1].killed}/{outcomes[-1].total} killed", flush=True)
    print(report(outcomes))


if __name__ == "__main__":
    main()
