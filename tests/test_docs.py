"""Every command the guides show parses: each `bindstream ...` line of a shell block in every .md file is
parsed by the CLI itself (options, choices, arguments; nothing runs), each `python bench/X.py ...` script
answers --help, and each shell block is valid bash. deploy/README.md's blocks are checked in depth by
test_deploy.py; this covers them all."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ASSETS, shared_file
from .test_deploy import check_shell, simple_commands

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted(p.relative_to(ROOT) for p in [*ROOT.glob("*.md"), *ROOT.glob("deploy/*.md")])
SHELL = ("bash", "sh", "console")


SYNOPSIS = re.compile(r"[\[\]<>|…]|\.\.\.")  # usage notation ([optional], a|b, ...), not a command line


def shell_lines(path: Path, folder: Path) -> list[str]:
    """The command lines a guide shows: every line of its shell blocks (continuations joined, comments
    dropped), and the `bindstream ...` commands of its other blocks and inline code, unless written in
    usage notation; the placeholder DIR (a folder of the reader's) becomes `folder`."""
    text, lines = (ROOT / path).read_text(), []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        body = re.sub(r"\\\n\s*", " ", body)
        lines += [
            line
            for line in body.splitlines()
            if line.strip()
            and not line.lstrip().startswith("#")
            and (lang in SHELL or (line.startswith("bindstream ") and not SYNOPSIS.search(line)))
        ]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [span for span in re.findall(r"`(bindstream [^`]+)`", prose) if not SYNOPSIS.search(span)]
    lines = [re.sub(r"\bDIR\b", str(folder), line) for line in lines]
    if any("../shared/" in line for line in lines):
        shared_file(ASSETS)  # the media the commands name: skip, saying so, where ../shared is missing
    return lines


def test_every_guide_is_checked():
    assert {"README.md", "PROTOCOL.md", "REDIS.md", "ALERTS.md", "SECURITY.md"} <= {str(p) for p in GUIDES}


@pytest.mark.parametrize("guide", GUIDES, ids=str)
def test_the_commands_a_guide_shows_parse(guide, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT / guide.parent)  # relative paths as the guide's reader would run them
    seen = {"ray": [], "bindstream": []}
    for line in shell_lines(guide, tmp_path):
        check_shell(line, seen)
        for argv in simple_commands(line):
            if argv[0] == "python" and len(argv) > 1 and argv[1].startswith("bench/"):
                script = ROOT / argv[1]
                assert script.exists(), f"{guide} shows {argv[1]}, which does not exist"
                result = subprocess.run(
                    [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
                )
                assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_readme_shows_the_main_commands(tmp_path):
    seen = {"ray": [], "bindstream": []}
    for line in shell_lines(Path("README.md"), tmp_path):
        check_shell(line, seen)
    commands = {argv[1] for argv, _ in seen["bindstream"] if len(argv) > 1}
    assert {"demo", "run", "simulate", "tail", "embed", "alert", "watch"} <= commands, commands
