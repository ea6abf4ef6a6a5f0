"""The README's commands still work as written, at least as far as their arguments go.

Every command line in README.md's shell blocks is checked without running it: a make target must exist in
the Makefile, a script must exist, the config files it names must exist, and its --key=value arguments
must pass configurator.overrides against the script's own defaults, the way the script itself reads them.
torchrun's own options go through torchrun's parser. Nothing trains, so this takes a few seconds.
"""
import ast
import functools
import importlib.util
import os
import re
import runpy
import shlex

import pytest

import configurator

REPO = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = ("python ", "torchrun ", "make ", ".venv/bin/python ")
PYTHON_BLOCKS = {"python", "py", "pycon", "pytb"}  # Python snippets, not command lines


def commands_in(text):
    """The command lines of text's fenced shell blocks, with backslash continuations joined."""
    commands, fence, joined = [], None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            joined = ""
            continue
        if fence is None or fence in PYTHON_BLOCKS:
            continue
        if not joined and (not stripped or stripped.startswith("#")):
            continue
        joined += (" " if joined else "") + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        if joined.startswith(PROGRAMS):
            commands.append(joined)
        joined = ""
    return commands


def makefile_targets():
    targets = set()
    with open(os.path.join(REPO, "Makefile")) as f:
        for line in f:
            # "a b: deps" is a rule; "X := y" and "X ?= y" are assignments, and recipes start with a tab
            match = re.match(r"^([^\s#=:][^=:]*):(?![=:])", line)
            if match:
                targets.update(match.group(1).split())
    return targets


def guarded(path):
    """Whether the script reads its config only under `if __name__ == "__main__":`, so that running it
    under another name defines its defaults and does nothing else."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


@functools.cache
def script_config(script):
    """The keys and default values a script accepts on its command line, read as the script reads them."""
    path = os.path.join(REPO, script)
    if script == "bench.py":
        # bench.py takes train.py's keys (script_defaults of train.py) plus its own BENCH_DEFAULTS
        namespace = runpy.run_path(path, run_name="readme_check")
        return {**configurator.script_defaults(os.path.join(REPO, "train.py")), **namespace["BENCH_DEFAULTS"]}
    if guarded(path):
        # some defaults are computed (prepare.py's num_proc), which script_defaults skips
        return configurator.defaults_from(runpy.run_path(path, run_name="readme_check"))
    return configurator.script_defaults(path)  # train.py reads its config at import: never run it


def parse_torchrun(args):
    """torchrun's own options through its parser; returns the script and the script's arguments."""
    from torch.distributed.run import get_args_parser
    parsed = get_args_parser().parse_args(args)  # a bad option exits with status 2
    return parsed.training_script, parsed.training_script_args


def check(command):
    """Raise AssertionError (or SystemExit, from a parser) if command would be refused."""
    tokens = shlex.split(command, comments=True)
    program, args = tokens[0], tokens[1:]
    if program == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t and t not in makefile_targets()]
        assert not missing, f"no Makefile target {', '.join(missing)}"
        return
    if program == "torchrun":
        script, args = parse_torchrun(args)
    elif args[0] == "-m":
        assert importlib.util.find_spec(args[1]), f"no module {args[1]}"
        return
    else:
        script, args = args[0], args[1:]
    assert os.path.isfile(os.path.join(REPO, script)), f"no script {script}"
    configurator.overrides(script_config(script), args)  # fail() exits on a bad key, value or config file


def check_readable(command, capsys):
    """check(), with the script's one error line as the failure message."""
    try:
        check(command)
    except SystemExit:
        pytest.fail(f"{command}\n  refused: {capsys.readouterr().err.strip()}", pytrace=False)


with open(os.path.join(REPO, "README.md")) as f:
    README_COMMANDS = commands_in(f.read())


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # config files are named relative to the repository, as the README runs them


@pytest.mark.parametrize("command", README_COMMANDS)
def test_readme_command_parses(command, capsys):
    check_readable(command, capsys)


def test_readme_has_commands_of_every_kind():
    # an extractor that found nothing would pass every check above
    programs = {shlex.split(c, comments=True)[0] for c in README_COMMANDS}
    assert {"make", "python", "torchrun"} <= programs, programs
    assert any(c.startswith("make demo") for c in README_COMMANDS)


def test_extraction():
    text = "\n".join([
        "```sh",
        "# a comment line",
        "python train.py config/train_gpt2.py   # trailing comment",
        "torchrun --nnodes=2 --node_rank=0 \\",
        "    --rdzv_endpoint=HOST:29500 train.py --parallel=fsdp   # the other node: --node_rank=1",
        "cd elsewhere",
        "```",
        "```python",
        "python train.py --not_a_command=1",
        "```",
        "    python prose.py   # outside any block",
    ])
    assert commands_in(text) == [
        "python train.py config/train_gpt2.py   # trailing comment",
        "torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:29500 train.py --parallel=fsdp   "
        "# the other node: --node_rank=1",
    ]


@pytest.mark.parametrize("command", [
    "python train.py --batch_sise=32",  # a misspelled key
    "python train.py config/no_such_config.py",  # a missing config file
    "python train.py --batch_size=thirty",  # a value of the wrong type
    "python sample.py --top_p",  # a bare flag that is not a boolean
    "python bench.py --iterations=3",  # bench's key is iters
    "python no_such_script.py",
    "make no-such-target",
    "torchrun --nproc-per-nodes=2 train.py",  # torchrun's own option misspelled
])
def test_wrong_commands_are_caught(command, capsys):
    with pytest.raises((SystemExit, AssertionError)):
        check(command)
