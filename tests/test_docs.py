"""The documentation keeps its promises: every relative link resolves, and every `python ...` command
line names a script (or module) and flags that its own `--help` lists."""

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from danet.paths import REPO

PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("**/*.md"), *(REPO / "results").glob("*/*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"```(?:bash|sh|console|shell)?\n(.*?)```", re.DOTALL)
INLINE = re.compile(r"`(python [^`]+)`")
RUN_FLAGS_AFTER_DASHES = {"sweeps/optuna_study.py", "sweeps/local_sweep.py", "sweeps/slurm.py"}  # `-- run.py flags`
NOT_OURS = {"pytest", "pip", "venv", "torch.distributed.run"}  # modules whose flags are not this project's


def _relative(page: Path) -> str:
    return str(page.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the page itself
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert broken == []


def command_lines(text: str) -> list[str]:
    """The `python ...` command lines of a page: in shell blocks (continuations joined) and inline code."""
    lines = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("python ") or line.startswith("torchrun "):
                lines.append(line)
    lines += [match.strip() for match in INLINE.findall(text)]
    return lines


@functools.cache
def help_text(program: tuple[str, ...]) -> str:
    result = subprocess.run([sys.executable, *program, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{' '.join(program)} --help failed: {result.stderr[-500:]}"
    return result.stdout


def _flags(tokens: list[str]) -> list[str]:
    found = []
    for token in tokens:
        token = token.strip("[]()|,;")
        if re.fullmatch(r"--[a-z][a-z0-9_-]*(=.*)?", token):
            found.append(token.split("=", 1)[0])
    return found


def check_command(line: str) -> list[str]:
    """The problems of one command line: a script that does not exist, flags its --help does not list."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        tokens = line.split()
    if tokens[0] == "torchrun":
        tokens = ["python", *tokens[next(i for i, t in enumerate(tokens) if t.endswith(".py")):]]
    tokens = tokens[1:]
    if tokens[:1] == ["-m"]:
        module = tokens[1]
        if module.split(".")[0] in NOT_OURS or module in NOT_OURS:
            return []
        program, rest = ("-m", module), tokens[2:]
        if rest and not rest[0].startswith("-"):  # a subcommand (python -m danet.bench train)
            program, rest = (*program, rest[0]), rest[1:]
    else:
        script = tokens[0]
        if not (REPO / script).is_file():
            return [f"no script {script}"]
        program, rest = (script,), tokens[1:]
    own, run_flags = rest, []
    if "--" in rest and program[0] in RUN_FLAGS_AFTER_DASHES:
        own, run_flags = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    problems = [f"{' '.join(program)}: {flag} is not in its --help" for flag in _flags(own)
                if not re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", help_text(program), re.MULTILINE)]
    run_help = help_text(("ablations/run.py",))
    problems += [f"run flags: {flag} is not in ablations/run.py --help" for flag in _flags(run_flags)
                 if not re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", run_help, re.MULTILINE)]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_every_command_line_names_a_script_and_flags_that_exist(page):
    problems = [f"{line}: {problem}" for line in command_lines(page.read_text()) for problem in check_command(line)]
    assert problems == []


def test_the_checker_catches_a_wrong_flag_and_a_missing_script():
    assert check_command("python ablations/run.py --pam --no-cam") == []
    assert check_command("python ablations/run.py --pam --no-such-flag") == [
        "ablations/run.py: --no-such-flag is not in its --help"]
    assert check_command("python sweeps/nowhere.py --grid demo") == ["no script sweeps/nowhere.py"]
    assert check_command("python sweeps/optuna_study.py --grid demo --study d -- --runs-dir x --bogus 1") == [
        "run flags: --bogus is not in ablations/run.py --help"]
