"""Plan and run a recipe: each stage in its own process, outputs published atomically with a manifest.

    from pipeline.recipe import load_recipe
    from pipeline.runner import plan, run, format_plan
    recipe = load_recipe("recipes/tiny.yaml")
    print(format_plan(recipe, plan(recipe)))   # done / will run and why, with each stage's command
    exit_code = run(recipe)                    # runs what is not done, in dependency order

Modules: `run` (plan and run), `stage` (what a stage module calls: `stage_main`, `StageContext`),
`process` (forked or fresh stage processes), `artifacts` (fingerprints, manifests, atomic publish),
`report` (RUN_DIR/report.md and its plots). A stage module is `stages/NAME.py` with
`run(ctx: StageContext)` and `if __name__ == "__main__": stage_main("NAME", run)`.
"""

from pipeline.runner.run import format_plan, plan, run
from pipeline.runner.stage import StageContext, StageError, stage_main

__all__ = ["StageContext", "StageError", "format_plan", "plan", "run", "stage_main"]
