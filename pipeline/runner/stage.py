"""What every stage module shares: argument parsing, input checks, work dirs and atomic publishing.

A stage module defines `run(ctx: StageContext)` and ends with
`if __name__ == "__main__": stage_main("NAME", run)`, so it runs alone as
`python -m stages.NAME RECIPE [KEY=VALUE ...]` or under `accelerate launch -m stages.NAME RECIPE`.
Every rank runs `run(ctx)`; the main rank then publishes the staged outputs with their manifest.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pipeline.errors import ConfigError, StageError
from pipeline.recipe.config import to_dict
from pipeline.recipe.schema import InputSpec, Recipe, load_recipe
from pipeline.recipe.stages import StageSettings
from pipeline.runner import artifacts

log = logging.getLogger("pipeline")
LOG_FILES = ("metrics.jsonl", "train_log.jsonl", "tensorboard")  # copied from the work dir when publishing
RUN_START_ENV = "PIPELINE_RUN_START"  # epoch seconds when `pipeline run` started (time-to-quality)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


S = TypeVar("S", bound=StageSettings)


@dataclass
class StageContext(Generic[S]):
    name: str
    recipe: Recipe
    settings: S  # the stage's typed settings (its class in pipeline/recipe/stages.py)
    inputs: dict[str, InputSpec]
    fingerprint: str
    input_fingerprints: dict[str, str]
    work_dir: Path  # persists across attempts with the same fingerprint (checkpoints live here)
    run_start: float
    metrics: dict[str, Any] = field(default_factory=dict)  # goes into the manifest

    @property
    def staging_dir(self) -> Path:
        return self.work_dir / "staging"

    def output_dir(self, output: str) -> Path:
        """Folder to write output `output` into; published atomically when the stage succeeds."""
        if output not in self.settings.OUTPUTS:
            raise ValueError(f"stage {self.name} declares no output {output!r}")
        path = self.staging_dir / output
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def seed(self) -> int:
        return self.recipe.seed


def prepare_work_dir(recipe: Recipe, name: str, fp: str) -> Path:
    """The stage's work dir, emptied when it belongs to other settings (stale checkpoints never resume)."""
    work = recipe.run_path / ".work" / name
    marker = work / "fingerprint"
    if work.exists() and (not marker.exists() or marker.read_text().strip() != fp):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(fp + "\n")
    shutil.rmtree(work / "staging", ignore_errors=True)
    return work


def check_upstream(recipe: Recipe, name: str, planned: dict) -> None:
    """Every referenced stage must be published with the fingerprint this recipe expects."""
    for spec in recipe.inputs[name].values():
        if spec.kind != "stage":
            continue
        manifest = artifacts.read_manifest(recipe.stage_dir(spec.stage))
        hint = f"run `python -m pipeline run {recipe.source} --only {spec.stage}` or the whole recipe"
        if manifest is None:
            raise StageError(f"stages.{name}.inputs.{spec.name}: stage {spec.stage!r} has not produced "
                             f"{spec.output} yet in {recipe.stage_dir(spec.stage)}; {hint}")
        if manifest["fingerprint"] != planned[spec.stage][0]:
            raise StageError(f"stages.{name}.inputs.{spec.name}: the outputs of stage {spec.stage!r} are stale "
                             f"(its settings or inputs changed); {hint}")
        if not spec.path.exists():
            raise StageError(f"stages.{name}.inputs.{spec.name}: {spec.path} is missing")


def build_manifest(ctx: StageContext, started: float) -> dict:
    return artifacts.make_manifest(
        stage=ctx.name,
        fingerprint=ctx.fingerprint,
        inputs={k: {"spec": v.spec, "kind": v.kind, "fingerprint": ctx.input_fingerprints[k],
                    **({"path": str(v.path)} if v.path else {})} for k, v in ctx.inputs.items()},
        outputs=sorted(o for o in ctx.settings.OUTPUTS if (ctx.staging_dir / o).exists()),
        settings=to_dict(ctx.settings),
        model=to_dict(ctx.recipe.model) if ctx.settings.USES_MODEL else None,
        seed=ctx.recipe.seed,
        metrics=ctx.metrics,
        started=started,
    )


def parse_args(argv: list[str] | None, name: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"Run the {name} stage of a recipe.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. stages.pretrain.max_steps=10")
    return parser.parse_args(argv)


def stage_main(name: str, body: Callable[[StageContext], None], argv: list[str] | None = None) -> None:
    """Entry point of a stage module; exits non-zero with a one-line reason on bad input."""
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    args = parse_args(argv, name)
    try:
        ctx = make_context(name, args.recipe, args.overrides)
    except (ConfigError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    started = time.time()
    try:
        body(ctx)
    except (ConfigError, StageError) as e:
        print(f"error: stage {name}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if is_main_process():
        final = ctx.recipe.stage_dir(name)
        ctx.staging_dir.mkdir(parents=True, exist_ok=True)
        for log_name in LOG_FILES:  # training curves travel with the outputs
            src = ctx.work_dir / log_name
            if src.is_dir():
                shutil.copytree(src, ctx.staging_dir / log_name)
            elif src.is_file():
                shutil.copy2(src, ctx.staging_dir / log_name)
        artifacts.publish(ctx.staging_dir, final, build_manifest(ctx, started))
        log.info("published %s (fingerprint %s)", final, ctx.fingerprint)


def make_context(name: str, recipe_path: str, overrides: list[str]) -> StageContext:
    recipe = load_recipe(recipe_path, overrides)
    if name not in recipe.settings:
        raise ConfigError(f"stages.{name}: this recipe has no {name} stage (it has {', '.join(recipe.settings)})")
    planned = artifacts.planned_fingerprints(recipe)
    check_upstream(recipe, name, planned)
    fp, input_fps = planned[name]
    work = prepare_work_dir(recipe, name, fp) if is_main_process() else recipe.run_path / ".work" / name
    run_start = float(os.environ.get(RUN_START_ENV) or time.time())
    return StageContext(name, recipe, recipe.settings[name], recipe.inputs[name], fp, input_fps, work, run_start)
