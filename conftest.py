"""Running the project's scripts from tests, fast.

The tests run the real scripts with real command lines, each in its own process. A fresh Python spends
seconds importing torch and torch._dynamo (creating an optimizer imports it), longer than most of those
runs take. So scripts start as children of
multiprocessing's fork server, which has imported torch, torch._dynamo, numpy and tiktoken once. Each child
is still a process of its own: its pid takes signals, and it has its own working folder, environment,
stdout, stderr and exit status (a script that raises prints its traceback and exits 1; one killed by a
signal reports minus that signal). Modules that read the environment when imported (datasets, wandb,
transformers, the project's own) are imported fresh in each child, after its environment is set."""
import atexit
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from multiprocessing import get_context

import pytest
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
FORK_SERVER = get_context("forkserver")
FORK_SERVER.set_forkserver_preload(["torch", "torch._dynamo", "numpy", "tiktoken"])


def _run_script(script, args, cwd, env, stdout_path, stderr_path):
    """In the child: become `python script *args` started in cwd with env."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS"):  # torch read it when the server imported torch
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except Exception:  # what nothing caught goes to sys.excepthook, as in the interpreter (multiprocessing
        sys.excepthook(*sys.exc_info())  # would print it itself): configurator.report's one line for bad input
        raise SystemExit(1) from None
    finally:
        atexit._run_exitfuncs()  # as the interpreter does on its way out (wandb finishes its run here)


class Started:
    """A script started by start(): the part of subprocess.Popen the tests use, text output included."""

    def __init__(self, script, args, cwd, env):
        self._dir = tempfile.TemporaryDirectory(prefix="script-output-")
        self._paths = [os.path.join(self._dir.name, name) for name in ("stdout", "stderr")]
        self.args = [script, *args]
        self._proc = FORK_SERVER.Process(target=_run_script, args=(os.path.join(REPO, script), args, str(cwd),
                                                                    env, *self._paths))
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self):
        return self._proc.exitcode

    def poll(self):
        return self._proc.exitcode

    def wait(self, timeout=None):
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def send_signal(self, sig):
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self._proc.kill()

    def communicate(self, timeout=None):
        """Wait, then (stdout, stderr)."""
        self.wait(timeout)
        return self.output()

    def output(self):
        out = []
        for path in self._paths:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    out.append(f.read())
            except FileNotFoundError:  # the child died before it got to its script
                out.append("")
        return tuple(out)


def read_log(path):
    """The records of a run's log.jsonl."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def start(script, *args, cwd, env=None):
    """Start `python script *args` (script relative to the repository) in cwd; env defaults to ours."""
    return Started(script, [str(a) for a in args], cwd, dict(os.environ) if env is None else env)


def run(script, *args, cwd, env=None, timeout=300):
    """Run a script to the end; a CompletedProcess with its exit status and text output."""
    proc = start(script, *args, cwd=cwd, env=env)
    try:
        stdout, stderr = proc.communicate(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def shakespeare_char(tmp_path_factory):
    """A function that puts the embedded corpus, prepared once at character level, into a folder's data/:
    most test modules need that dataset without testing how it is made (test_data.py does that)."""
    prepared = tmp_path_factory.mktemp("prepared")
    p = run("prepare.py", "--tokenizer=char", "--num_proc=1", cwd=prepared)
    assert p.returncode == 0, p.stderr
    return lambda folder: shutil.copytree(prepared / "data" / "shakespeare_char", folder / "data" / "shakespeare_char")
