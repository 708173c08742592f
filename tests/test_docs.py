"""The README's and docs/'s examples are tested, so that they cannot drift from the code.

Every fenced ``bash`` or ``python`` block in README.md and docs/*.md is either run here, in a
directory holding tiny fixtures (``adapters/``: three rank-2 LoRA adapters; ``base-model/``: their
base; ``full-ckpts/``: three full fine-tuned checkpoints of it), or marked illustrative with a reason
on the line before it::

    <!-- docs-test: illustrative (minutes of training on a CPU) -->

And every ``fedbip ...`` command line in any block, run or not, must name an existing command and
only options that command has: a documented option that no longer exists fails this test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import typer.main
from safetensors.torch import save_file
from typer.testing import CliRunner

from fedbip_cli.cli import app
from tests.factories import random_factors, write_lora_adapter

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*docs-test:\s*(run|illustrative|output)\s*(?:\((?P<reason>[^)]*)\))?\s*-->")
# FEDBIP_UPDATE_DOCS=1 pytest tests/test_docs.py writes each run block's output into the page.
UPDATE = os.environ.get("FEDBIP_UPDATE_DOCS") == "1"
TESTED = ("bash", "python")
SHAPES = {"encoder.layer.0.attention.query": (8, 8), "encoder.layer.1.attention.query": (8, 8)}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence
    language: str
    text: str
    marker: str | None  # "run", "illustrative", "output" or None
    reason: str | None
    end: int = 0  # line of the closing fence

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` with its language and the docs-test marker before it."""
    found = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(```+)(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(previous)
        found.append(
            Block(
                page,
                i + 1,
                fence.group(2),
                "\n".join(lines[i + 1 : end]),
                marker.group(1) if marker else None,
                marker.group("reason") if marker else None,
                end + 1,
            )
        )
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
EXAMPLES = [b for b in ALL if b.language in TESTED]


def output_of(block: Block, among: list[Block] | None = None) -> Block | None:
    """The block marked ``output`` right after ``block``: what running it prints."""
    following = [b for b in (ALL if among is None else among) if b.page == block.page and b.line > block.line]
    after = min(following, key=lambda b: b.line, default=None)
    return after if after is not None and after.marker == "output" else None


def normalized(text: str, work: Path) -> str:
    """The text without the working directory's path, all runs of white space one space (rich centres
    and wraps titles by the path's length, which differs from one machine to the next)."""
    return " ".join(text.replace(f"{work}/", "").replace(str(work), ".").split())


def commands(text: str) -> list[list[str]]:
    """The ``fedbip`` command lines of a shell block (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*(\$\s+)?", "", line)
        if not line.startswith("fedbip "):
            continue
        words = shlex.split(line, comments=True)
        words = words[: next((k for k, w in enumerate(words) if w in ("|", ">", "&&", ";", "2>")), len(words))]
        found.append(words)
    return found


def options_of(command: Any) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


def test_every_example_is_run_or_marked_illustrative_with_a_reason() -> None:
    unmarked = [b.id for b in EXAMPLES if b.marker not in ("run", "illustrative")]
    assert not unmarked, f"mark these blocks <!-- docs-test: run --> or illustrative (reason): {unmarked}"
    reasonless = [b.id for b in EXAMPLES if b.marker == "illustrative" and not (b.reason or "").strip()]
    assert not reasonless, f"an illustrative block needs its reason: {reasonless}"


@pytest.mark.parametrize("block", [b for b in ALL if b.language in ("bash", "sh", "console", "")], ids=lambda b: b.id)
def test_documented_commands_and_options_exist(block: Block) -> None:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")  # a command group, whichever click typer runs on
    for words in commands(block.text):
        name = words[1] if len(words) > 1 and not words[1].startswith("-") else None
        if name is None:
            assert set(w.split("=")[0] for w in words[1:] if w.startswith("-")) <= options_of(group) | {"--help"}
            continue
        assert name in group.commands, f"{block.id}: no command fedbip {name}"
        known = options_of(group.commands[name]) | {"--help"}
        used = {w.split("=")[0] for w in words[2:] if w.startswith("--") or re.fullmatch(r"-[a-zA-Z]", w)}
        assert used <= known, f"{block.id}: fedbip {name} has no option(s) {sorted(used - known)}"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with adapters/, base-model/ and full-ckpts/ (tiny, random, seeded)."""
    root = tmp_path_factory.mktemp("docs")
    generator = torch.Generator().manual_seed(0)
    # Two tasks: alice and bob share one (a common direction plus their own), carol has another.
    tasks = [random_factors(SHAPES, generator, r=2) for _ in range(2)]
    for name, task in (("alice", 0), ("bob", 0), ("carol", 1)):
        own = random_factors(SHAPES, generator, r=2)
        factors = {
            m: (torch.cat([a, a2]), torch.cat([b, 0.5 * b2], dim=1))
            for m, ((a, b), (a2, b2)) in ((m, (tasks[task][m], own[m])) for m in SHAPES)
        }
        write_lora_adapter(root / "adapters" / name, factors, r=4, lora_alpha=8)
    base = root / "base-model"
    base.mkdir()
    weights = {f"{m}.weight": torch.randn(*shape, generator=generator) for m, shape in SHAPES.items()}
    save_file(weights, str(base / "model.safetensors"))
    (base / "config.json").write_text('{"model_type": "bert"}')
    shared = {k: torch.randn(v.shape, generator=generator) for k, v in weights.items()}
    for name, near in (("site-a", 1.0), ("site-b", 1.0), ("site-c", 0.0)):
        directory = root / "full-ckpts" / name
        directory.mkdir(parents=True)
        tuned = {
            k: v + 0.1 * (near * shared[k] + torch.randn(v.shape, generator=generator)) for k, v in weights.items()
        }
        save_file(tuned, str(directory / "model.safetensors"))
        (directory / "config.json").write_text('{"model_type": "bert"}')
    return root


@pytest.mark.parametrize("block", [b for b in EXAMPLES if b.marker == "run"], ids=lambda b: b.id)
def test_runnable_examples_run(block: Block, fixtures: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    subprocess.run(["cp", "-r", str(fixtures), str(work)], check=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = (
        ["bash", "-euo", "pipefail", "-c", block.text]
        if block.language == "bash"
        else [sys.executable, "-c", block.text]
    )
    env["COLUMNS"] = "100"
    result = subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=600
    )  # Flower's TLS run: minutes
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    shown = output_of(block)
    if shown is None:
        return
    printed = normalized(result.stdout + result.stderr, work)
    if UPDATE:  # the page as it is now (an earlier update may have moved its lines)
        current = next(b for b in blocks(block.page) if b.text == block.text and b.marker == "run")
        target = output_of(current, blocks(block.page))
        assert target is not None
        raw = (result.stdout + result.stderr).replace(f"{work}/", "").replace(str(work), ".").rstrip()
        lines = block.page.read_text(encoding="utf-8").splitlines()
        lines[target.line : target.end - 1] = [line.rstrip() for line in raw.splitlines()]
        block.page.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return
    assert printed == normalized(shown.text, work), (
        f"{shown.id}: the page shows another output (FEDBIP_UPDATE_DOCS=1 rewrites it)"
    )


def test_help_examples_use_existing_options() -> None:
    """The examples in each command's --help (its epilog), and in fedbip --help, are documentation too; each
    also lists the exit codes."""
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")  # a command group, whichever click typer runs on
    for name, command in group.commands.items():
        examples = commands(command.epilog or "")
        assert examples, f"fedbip {name} --help shows no example"
        assert "Exit codes" in (command.epilog or ""), f"fedbip {name} --help does not list its exit codes"
        for words in examples:
            assert words[1] == name
            used = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
            assert used <= options_of(command), f"fedbip {name} --help uses {sorted(used - options_of(command))}"
    examples = commands(group.epilog or "")
    assert examples and "Exit codes" in (group.epilog or ""), "fedbip --help shows no example or no exit codes"
    for words in examples:
        assert words[1] in group.commands, f"fedbip --help shows an example of no command: {words}"
        used = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
        assert used <= options_of(group.commands[words[1]]), f"fedbip --help uses {words}"


def slug(header: str) -> str:
    """GitHub's anchor of a markdown header."""
    return re.sub(r"[^\w\- ]", "", header.strip("# ").strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = page.parent / path if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headers = re.findall(r"^#{1,6} .*$", linked.read_text(encoding="utf-8"), re.MULTILINE)
            if anchor not in {slug(h) for h in headers}:
                broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_every_figure_in_docs_is_shown_on_a_page() -> None:
    """A figure no page shows is a stale output of an experiment, kept without being read."""
    shown = set()
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s#]+)\)", page.read_text(encoding="utf-8")):
            shown.add((page.parent / target).resolve())
    figures = {p.resolve() for p in (ROOT / "docs").glob("*.png")}
    assert figures, "docs/ has no figures: the glob is wrong"
    assert not figures - shown, f"figures no page shows: {sorted(p.name for p in figures - shown)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_generated_sections_name_the_script_that_wrote_them(page: Path) -> None:
    """A section between <!-- generated: NAME --> markers is closed, and says which script, machine
    and date wrote it; the script exists (benchmarks/docgen.py writes these)."""
    text = page.read_text(encoding="utf-8")
    for name in re.findall(r"<!-- generated: ([\w-]+) -->", text):
        section = text.split(f"<!-- generated: {name} -->", 1)[1]
        assert f"<!-- /generated: {name} -->" in section, f"{page.name}: section {name} is not closed"
        body = section.split(f"<!-- /generated: {name} -->", 1)[0]
        made = re.search(r"\*Generated by `([^` ]+)[^`]*` on .+, \d{4}-\d\d-\d\d", body)
        assert made, f"{page.name}: section {name} does not say what generated it"
        assert (ROOT / made.group(1)).is_file(), f"{page.name}: {made.group(1)} does not exist"


def _is_markup(inner: str) -> bool:
    """Whether ``[inner]`` is rich markup that is meant as a style (``[b]``, ``[/b]``, ``[dim]``), not text."""
    from rich.errors import StyleSyntaxError
    from rich.style import Style

    if inner.startswith("/"):
        return True
    try:
        Style.parse(inner)
    except StyleSyntaxError:
        return False
    return bool(inner.strip())


def meant(source: str) -> str:
    """What a help string means to show: escaped brackets (``\\[flower]``) and brackets that are no rich
    style (``[flower]``, ``[@revision]``) as text, style tags (``[b]``, ``[/b]``) dropped."""
    return re.sub(
        r"(\\?)\[([^\[\]\n]*)\]",
        lambda m: f"[{m.group(2)}]" if m.group(1) or not _is_markup(m.group(2)) else "",
        source,
    )


def help_sources() -> dict[str, list[str]]:
    """Every help string written in the source, per command ('' for ``fedbip`` itself): the command's
    help and epilog and each parameter's help, as typer received them."""
    from typer.utils import get_params_from_function

    callback = app.registered_callback.callback if app.registered_callback else None
    found: dict[str, list[str]] = {
        "": [app.info.help or getattr(callback, "__doc__", None) or "", app.info.epilog or ""]
    }
    for info in app.registered_commands:
        assert info.callback is not None
        name = info.name or info.callback.__name__.replace("_", "-")
        texts = [info.help or info.callback.__doc__ or "", info.epilog or ""]
        texts += [getattr(p.default, "help", None) or "" for p in get_params_from_function(info.callback).values()]
        found[name] = [t for t in texts if t.strip()]
    return found


@pytest.mark.parametrize("name", sorted(help_sources()), ids=lambda n: n or "fedbip")
def test_help_shows_every_help_string_with_its_brackets(name: str) -> None:
    """Each help string of a command appears whole in its rendered --help: rich markup must not eat a
    bracketed extra or placeholder (``pip install 'fedbip[flower]'``, ``hf://owner/repo[@revision]``),
    and no help text may be dropped (typer 0.20 under click 8.5 drops an argument's help)."""
    from typer.testing import CliRunner

    env = {"COLUMNS": "1000", "TERMINAL_WIDTH": "1000", "NO_COLOR": "1"}
    result = CliRunner().invoke(app, [*([name] if name else []), "--help"], env=env)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.replace("│", " ").split())
    for source in help_sources()[name]:
        text = " ".join(meant(inspect_cleandoc(source)).split())
        assert text in shown, f"fedbip {name} --help does not show: {text!r}"


def inspect_cleandoc(text: str) -> str:
    import inspect

    return inspect.cleandoc(text)


def test_shell_completion_is_documented_and_completes_commands_and_options() -> None:
    """docs/cli.md tells how to install typer's completion, and the script it installs completes
    every command's name and its options (the protocol bash's script speaks to ``fedbip``)."""
    documented = {w for b in blocks(ROOT / "docs" / "cli.md") for line in commands(b.text) for w in line}
    assert {"--install-completion", "--show-completion"} <= documented
    fedbip = Path(sys.executable).parent / "fedbip"
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")  # a command group, whichever click typer runs on
    for name, command in group.commands.items():
        env = {**os.environ, "_FEDBIP_COMPLETE": "complete_bash", "COMP_CWORD": "1", "COMP_WORDS": f"fedbip {name[:3]}"}
        offered = subprocess.run([str(fedbip)], env=env, capture_output=True, text=True, timeout=60).stdout.split()
        assert name in offered, f"completion of 'fedbip {name[:3]}' offers {offered}"
        option = sorted(o for o in options_of(command) if o.startswith("--") and o != "--help")[0]
        env.update(COMP_CWORD="2", COMP_WORDS=f"fedbip {name} {option[:-1]}")
        offered = subprocess.run([str(fedbip)], env=env, capture_output=True, text=True, timeout=60).stdout.split()
        assert option in offered, f"completion of 'fedbip {name} {option[:-1]}' offers {offered}"


def test_write_generated_replaces_only_its_section_and_says_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provenance line is the command this process was run with (sys.argv), never a string a script
    types for itself, which drifts from the options a run really had."""
    from benchmarks.docgen import write_generated

    page = tmp_path / "page.md"
    page.write_text("before\n<!-- generated: x -->\nold 1.0 s\n<!-- /generated: x -->\nafter\n", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "docgen.py"), "--flag", "two words"])
    write_generated(page, "x", "new 2.0 s", note="load average 3.0")
    text = page.read_text(encoding="utf-8")
    head, body, tail = text.split("<!-- generated: x -->")[0], text.split("-->", 1)[1], text.rsplit("-->", 1)[1]
    assert head == "before\n" and tail == "\nafter\n" and "old" not in text
    assert body.startswith("\nnew 2.0 s\n\n*Generated by `benchmarks/docgen.py --flag 'two words'` on ")
    assert "; load average 3.0.*\n<!-- /generated: x -->" in text
    assert re.search(r"\*Generated by `([^` ]+)[^`]*` on .+, \d{4}-\d\d-\d\d", body)  # what the page test reads
    with pytest.raises(ValueError, match="no <!-- generated: y -->"):
        write_generated(page, "y", "text")


def test_bench_summary_for_the_docs_takes_its_ratios_from_one_run() -> None:
    """peft ÷ fedbip is peft's time per client over fedbip's global merge's, from the same rows."""
    from benchmarks import report

    def row(key: str, wall: float, clients: int = 32, name: str = "7b-attn", **extra: object) -> dict:
        return {"name": name, "workload": name, "key": key, "contender": key, "quick": False, "clients": clients,
                "input_mb": 1074.9, "status": "ok", "wall_s": wall, "per_client_s": wall / clients,
                "peak_rss_mb": 700.0, "error": "", "how": "", **extra}  # fmt: skip

    rows = [
        row("floor", 2.0, floor_ratio=1.0),
        row("arithmetic", 8.0),
        row("merge", 64.0, floor_ratio=16.0, both_ratio=8.0),
        row("peft", 76800.0, estimated=True),
        row("inspect", 26.0, clients=1000, name="many-clients"),
    ]
    assert report.speedups(rows) == {"7b-attn": 1200.0}
    tables = report.docs_tables(rows)
    assert "| 7b-attn | 32 | 64 | 16.0 | 8 | 8.0 | 2 | ≈ 2,400 | **1,200×** | 700 |" in tables
    assert "| 7b-attn merge ≤ 2× max(I/O floor, arithmetic floor) | 8.0× | **missed** |" in tables
    assert "| many-clients: inspect | 1,000 | 26 | 700 |" in tables
    bullet = report.readme_bullet(rows)
    assert "32 clients of a 7B model's attention LoRA (1,075 MB) merged in 64 s, **1,200×** faster" in bullet
    assert "exact similarity of 1,000 clients in 26 s" in bullet


# Words of the project's own bookkeeping that mean nothing to a reader of the docs.
BOOKKEEPING = re.compile(
    r"\bissue\s+\d+|\bthe issue'?s?\b|\blent to this task\b|\.ci/run\b|\bthis task\b", re.IGNORECASE
)
READER_PAGES = [
    *PAGES,
    ROOT / "CHANGELOG.md",
    *sorted((ROOT / "benchmarks").glob("RESULTS*.md")),
    *sorted((ROOT / "examples").rglob("*.*")),
]


@pytest.mark.parametrize("page", READER_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_to_readers_not_of_internal_bookkeeping(page: Path) -> None:
    found = [
        f"{page.name}:{n}: {m.group(0)!r}"
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1)
        for m in BOOKKEEPING.finditer(line)
    ]
    assert found == []


def test_the_bookkeeping_check_can_fail() -> None:
    for sentence in ("runs issue 4's benchmark", "the issue's target", "no GPU was lent to this task", "see .ci/run"):
        assert BOOKKEEPING.search(sentence), sentence
    assert not BOOKKEEPING.search("an open issue of peft's tracker is fixed in 0.13")


@pytest.mark.parametrize("page", [*PAGES, *sorted((ROOT / "benchmarks").glob("RESULTS*.md"))], ids=lambda p: p.name)
def test_provenance_lines_give_commands_with_relative_paths(page: Path) -> None:
    """A generated section names the command that measured it; an absolute path there publishes the
    layout of the machine that ran it and works nowhere else."""
    commands = re.findall(r"(?:Generated|Written) by `([^`]+)`", page.read_text(encoding="utf-8"))
    absolute = [c for c in commands if any(word.split("=")[-1].startswith("/") for word in shlex.split(c))]
    assert absolute == []


def test_invocation_makes_absolute_arguments_relative(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from benchmarks.docgen import invocation

    monkeypatch.chdir(tmp_path)
    argv = [str(ROOT / "benchmarks" / "science.py"), str(tmp_path / "runs" / "a"), f"--json={tmp_path}/f.json", "-q"]
    assert invocation(argv) == "benchmarks/science.py runs/a --json=f.json -q"


def test_sketch_dim_help_points_to_the_measured_figures() -> None:
    """The sketch's measured errors and times live in one generated place; the help names it, quoting none."""
    shown = CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "300"}).stdout
    help_text = " ".join(shown.replace("│", " ").split())
    start = help_text.index("--sketch-dim")
    option = help_text[start : start + 700]
    assert "docs/inspect.md" in option and "Huge K" in option
    assert not re.search(r"\d+(\.\d+)? ?s\b|0\.0\d", option.split("--sketch-seed")[0]), option
    assert "Huge K: sketched similarity" in (ROOT / "docs" / "inspect.md").read_text(encoding="utf-8")
