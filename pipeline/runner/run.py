"""Plan and run a recipe: stages in dependency order, each in its own process (pipeline/runner/process.py).

A stage whose published manifest carries the fingerprint the recipe expects is skipped; a stage whose
settings or inputs changed re-runs, and so does everything downstream (their input fingerprints change).
Training stages start under `accelerate launch` (DeepSpeed allows one accelerator per process).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass

from pipeline.recipe.config import ConfigError
from pipeline.recipe.schema import Recipe
from pipeline.runner import artifacts
from pipeline.runner.process import run_stage
from pipeline.runner.stage import RUN_START_ENV


@dataclass
class PlannedStage:
    name: str
    fingerprint: str
    upstream: list[str]
    status: str  # done | run | skip (not selected by --only)
    reason: str
    command: list[str]
    num_processes: int
    inputs: dict[str, str]  # input name -> its fingerprint when planned


def stage_command(recipe: Recipe, name: str) -> list[str]:
    settings = recipe.settings[name]
    args = ["-m", f"stages.{name}", str(recipe.source), *recipe.overrides]
    launch = settings.launch
    if not settings.ACCELERATED or (launch.num_processes == 1 and launch.config_file is None):
        return ["python", *args]
    cmd = ["accelerate", "launch", "--num_processes", str(launch.num_processes)]
    if launch.config_file:
        cmd += ["--config_file", launch.config_file]
    else:  # several processes and no config: plain data parallel (on CPU too, see launch_env)
        cmd += ["--multi_gpu"]
    return [*cmd, *launch.extra_args, *args]


def plan(recipe: Recipe, only: list[str] | None = None, force: list[str] | None = None) -> list[PlannedStage]:
    for option, names in (("--only", only), ("--force", force)):
        for n in names or []:
            if n not in recipe.settings:
                raise ConfigError(f"{option} {n}: no such stage in this recipe (stages: {', '.join(recipe.settings)})")
    planned = artifacts.planned_fingerprints(recipe)
    out: list[PlannedStage] = []
    reruns: set[str] = set()
    for name in recipe.order():
        fp = planned[name][0]
        manifest = artifacts.read_manifest(recipe.stage_dir(name))
        upstream = recipe.upstream(name)
        if only and name not in only:
            status, reason = ("done", "up to date") if manifest and manifest["fingerprint"] == fp else ("skip", "not selected by --only")
        elif force and name in force:
            status, reason = "run", "forced"
        elif manifest is None:
            status, reason = "run", "no complete outputs yet"
        elif manifest["fingerprint"] != fp:
            changed = [u for u in upstream if u in reruns]
            reason = f"upstream {', '.join(changed)} re-runs" if changed else "settings or inputs changed"
            status = "run"
        else:
            status, reason = "done", f"up to date ({manifest.get('finished', '?')})"
        if status == "run":
            reruns.add(name)
        launch = recipe.settings[name].launch
        out.append(PlannedStage(name, fp, upstream, status, reason, stage_command(recipe, name), launch.num_processes,
                                planned[name][1]))
    return out


def changed_inputs(stage: PlannedStage, manifest: dict) -> str:
    """The inputs whose fingerprint in `manifest` differs from the plan's, as `name (path)`."""
    published = manifest.get("inputs", {})
    changed = [f"input {k} ({published[k].get('path') or published[k].get('spec')})" for k, fp in stage.inputs.items()
               if k in published and published[k].get("fingerprint") != fp]
    return ", ".join(changed) or "its settings or inputs"


def format_plan(recipe: Recipe, stages: list[PlannedStage]) -> str:
    lines = [f"recipe {recipe.source}  run_dir {recipe.run_path}"]
    for s in stages:
        after = f" <- {', '.join(s.upstream)}" if s.upstream else ""
        lines.append(f"  {s.name:<12} {s.status:<5} {s.reason}{after}")
        lines.append(f"               fingerprint {s.fingerprint}")
        lines.append(f"               $ {shlex.join(s.command)}")
    return "\n".join(lines)


def launch_env(recipe: Recipe, stage: PlannedStage, run_start: float) -> dict[str, str]:
    from pipeline.train.distributed import launch_env as distributed_env

    env = dict(os.environ)
    env[RUN_START_ENV] = str(run_start)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if recipe.settings[stage.name].ACCELERATED:
        env.update(distributed_env(stage.num_processes, recipe.settings[stage.name].launch.config_file))
    return env


def run(recipe: Recipe, only: list[str] | None = None, force: list[str] | None = None) -> int:
    """Run what the plan says; returns the exit code (non-zero names the failed stage)."""
    run_start = time.time()
    stages = plan(recipe, only, force)
    missing = [s for s in stages if s.status == "skip"]
    for s in stages:
        if s.status == "run":
            blocked = [m.name for m in missing if m.name in s.upstream]
            if blocked:
                print(f"error: stage {s.name} needs {', '.join(blocked)}, which is not done and not selected",
                      file=sys.stderr)
                return 2
    recipe.run_path.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(stages):
        if s.status != "run":
            print(f"[pipeline] {s.name}: {s.reason}, skipped", flush=True)
            continue
        print(f"[pipeline] {s.name}: {s.reason}; running\n[pipeline] $ {shlex.join(s.command)}", flush=True)
        start = time.time()
        later = [m for t in stages[i + 1:] if t.status == "run" and t.command[0] == "python"
                 for m in recipe.settings[t.name].IMPORTS]
        code = run_stage(s.command, s.name, launch_env(recipe, s, run_start), recipe.settings[s.name].IMPORTS,
                         upcoming=tuple(dict.fromkeys(later)))
        if code != 0:
            print(f"error: stage {s.name} failed (exit code {code}); outputs of finished stages are kept, "
                  f"its work folder {recipe.run_path / '.work' / s.name} too (a re-run resumes)", file=sys.stderr)
            return code if code > 0 else 1
        manifest = artifacts.read_manifest(recipe.stage_dir(s.name))
        if manifest is None:
            print(f"error: stage {s.name} exited 0 but published no complete manifest", file=sys.stderr)
            return 1
        if manifest["fingerprint"] != s.fingerprint:
            print(f"error: stage {s.name}: {changed_inputs(s, manifest)} changed while the pipeline ran (planned "
                  f"fingerprint {s.fingerprint}, published {manifest['fingerprint']}); its outputs describe the new "
                  f"state and are kept, run again to bring the later stages up to date", file=sys.stderr)
            return 1
        print(f"[pipeline] {s.name}: done in {time.time() - start:.1f} s", flush=True)
    if (code := push_outputs(recipe, [s.name for s in stages if s.status != "skip"])) != 0:
        return code
    from pipeline.runner.report import build_report

    report = build_report(recipe.run_path)
    print(f"[pipeline] all stages done in {time.time() - run_start:.1f} s; outputs in {recipe.run_path}; report {report}")
    return 0


def push_outputs(recipe: Recipe, names: list[str]) -> int:
    """Upload the outputs of done stages that have `push:` and are not yet on the hub; a failed push
    leaves the stage done (its outputs are fine) and exits non-zero."""
    from pipeline.hub.push import PushError, pending_pushes, push_stage_outputs

    for name in names:
        settings = recipe.settings[name].push
        if settings is None or not pending_pushes(recipe.run_path, name, settings):
            continue
        try:
            for where in push_stage_outputs(recipe.run_path, name, settings):
                print(f"[pipeline] {name}: pushed to {where}", flush=True)
        except PushError as e:
            print(f"error: stage {name}: push failed: {e}; the stage stays done, re-run to retry the push",
                  file=sys.stderr)
            return 1
    return 0
