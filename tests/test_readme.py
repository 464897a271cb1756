"""Every README snippet runs as written: each ```python block is executed on its own, in a fresh
namespace (so a snippet defines what it uses, and one broken snippet fails alone), and every
`sparserec ...` command line of the ```bash blocks is parsed and checked by the CLI (no work is
run). A python block whose first line is `# needs CUDA` is skipped on machines without a GPU;
better, write snippets that pick their device (`"cuda" if torch.cuda.is_available() else "cpu"`)."""
import os
import re
import shlex

import pytest
import torch

from sparserec import cli

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
NEEDS_CUDA = "# needs CUDA"


def blocks(language):
    """(first line number, code) of every ```language block of the README."""
    text = open(README, encoding="utf-8").read()
    found = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M):
        found.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return found


PYTHON_BLOCKS = blocks("python")


def test_readme_has_python_snippets():
    assert PYTHON_BLOCKS, "README.md has no ```python block"


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_python_snippet_runs(line, code):
    if code.lstrip().startswith(NEEDS_CUDA) and not torch.cuda.is_available():
        pytest.skip(f"README.md line {line}: the snippet needs CUDA")
    exec(compile(code, f"README.md (python block at line {line})", "exec"), {"__name__": "__readme__"})


def readme_commands():
    """Every `sparserec ...` command of the bash blocks, without comments; '...' marks an elision."""
    commands = []
    for line_number, code in blocks("bash"):
        for offset, line in enumerate(code.splitlines()):
            command = line.split("#", 1)[0].strip()
            if command.startswith("sparserec ") and "..." not in command:
                commands.append((line_number + offset, command))
    return commands


def test_readme_has_cli_commands():
    assert len(readme_commands()) >= 5


@pytest.mark.parametrize("line, command", readme_commands(), ids=[f"line{line}" for line, _ in readme_commands()])
def test_cli_command_parses_and_passes_the_argument_checks(line, command, capsys):
    args = cli.parse_args(shlex.split(command)[1:])  # exits (SystemExit) on a bad option or combination
    assert callable(args.handler)
    assert capsys.readouterr().err == ""
