"""Start a stage's process: forked from a runner that already imported the heavy libraries, or fresh.

Importing torch, transformers, accelerate, DeepSpeed and datasets takes 4-8 s per process on a 2-core machine,
and a recipe of eight single-process stages paid it eight times (~10% of the tiny recipe). On a machine
without accelerators the runner imports them once, when the first stage has to run, and forks one child
per stage. Each stage still runs in a process of its own (its own exit code, its memory returned at
exit, a crash or `kill -9` takes only it down), it just starts in milliseconds.

Forking is safe here only because the runner itself never runs a torch op (OpenMP's thread pool does
not survive a fork) and never forks with other threads alive. It is not used on GPU machines: CUDA
cannot be used in a child forked after the parent touched it, and library imports may probe devices;
there, and for `accelerate launch` stages, the stage starts in a fresh interpreter as before.
`PIPELINE_FORK_STAGES=0` turns forking off everywhere.
"""

from __future__ import annotations

import atexit
import importlib
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

ACCELERATOR_DEVICES = ("/dev/nvidiactl", "/dev/kfd", "/dev/accel")  # NVIDIA, AMD ROCm, other accelerators


def can_fork() -> bool:
    if os.environ.get("PIPELINE_FORK_STAGES", "1") == "0" or not hasattr(os, "fork"):
        return False
    return not any(Path(p).exists() for p in ACCELERATOR_DEVICES)


def preload(modules: tuple[str, ...], env: dict[str, str], stop: Callable[[], bool] = lambda: False) -> None:
    """Import `modules` in this process, under the stage's environment (OpenMP and DeepSpeed read
    theirs at import), until `stop()` says so; this process's own environment is left as it was.
    A module that fails to import here fails in the stage, which reports it; a module that does not
    exist at all is a wrong name in a stage's IMPORTS declaration and stops the run."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        for name in modules:
            if stop():
                break
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name == name:
                    raise RuntimeError(f"a stage declares IMPORTS {name!r}, which is no module "
                                       f"(pipeline/recipe/stages.py)") from None
            except Exception:
                pass
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_stage(command: list[str], stage: str, env: dict[str, str], imports: tuple[str, ...] = (),
              upcoming: tuple[str, ...] = ()) -> int:
    """Run a stage's command; returns its exit code (negative: killed by that signal), as
    `subprocess.call` does. `command` is the one the plan shows (`python -m stages.X RECIPE ...`);
    `imports` are the modules the stage imports inside `run` (its settings' IMPORTS); `upcoming` those
    of the stages after it, imported while this one runs (the import overlaps the stage's work)."""
    if command[0] == "python" and command[1:3] == ["-m", f"stages.{stage}"] and can_fork():
        preload(("torch", *imports, f"stages.{stage}"), env)
        if threading.active_count() == 1:
            return _fork(stage, command[3:], env, upcoming)
    if command[0] == "python":
        return subprocess.call([sys.executable, *command[1:]], env=env)
    if command[0] == "accelerate":  # this interpreter's accelerate, whatever PATH says
        return subprocess.call([sys.executable, "-m", "accelerate.commands.launch", *command[2:]], env=env)
    return subprocess.call(command, env=env)


def _fork(stage: str, argv: list[str], env: dict[str, str], upcoming: tuple[str, ...]) -> int:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the runner
        os._exit(_child(stage, argv, env))
    print(f"[pipeline] {stage}: forked from the runner, pid {pid}", flush=True)
    ended: list[int] = []

    def child_ended() -> bool:  # stop importing ahead once the stage is done: the next one waits on us
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            ended.append(status)
        return bool(done)

    preload(upcoming, env, stop=child_ended)
    status = ended[0] if ended else os.waitpid(pid, 0)[1]
    return os.waitstatus_to_exitcode(status)


def _child(stage: str, argv: list[str], env: dict[str, str]) -> int:
    """Behave like `python -m stages.<stage> ARGV` under `env`: the same exit codes, then the same exit
    sequence (threads stopped and joined, atexit handlers, streams flushed)."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(env)
        for stream in (sys.stdout, sys.stderr):  # PYTHONUNBUFFERED, as a fresh stage process has
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=True, write_through=True)
        import torch

        if env.get("OMP_NUM_THREADS"):  # OpenMP read the variable when the parent loaded it
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        sys.argv = [f"-m stages.{stage}", *argv]
        module = importlib.import_module(f"stages.{stage}")
        from pipeline.runner.stage import stage_main

        stage_main(stage, module.run, argv)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    try:
        # the interpreter's own exit sequence: threading's atexit hooks (they stop executor workers,
        # e.g. torch.compile's), then the non-daemon threads are joined, then atexit handlers
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
        code = code or 1
    return code
