"""Instructions stage: the default task's datasets, built offline and deterministically.

    python -m stages.instructions recipes/tiny.yaml

Outputs (each a `datasets` folder with `train` and `validation` splits; see docs/task.md):
`sft/` demonstrations (`messages`), `preferences/` pairs, rankings or ratings ordered by the
programmatic judge, `prompts/` prompts with their constraints for PPO and evaluation. Recipes that bring
their own data point the SFT, reward and PPO stages at folders or hub datasets instead.
"""

from __future__ import annotations

import logging

from pipeline.recipe.stages import InstructionsSettings
from pipeline.runner.stage import StageContext, stage_main
from pipeline.task import instructions as task

log = logging.getLogger("pipeline")


def run(ctx: StageContext[InstructionsSettings]) -> None:
    s = ctx.settings
    built = {
        "sft": task.build_sft_dataset(s.sft_train, s.sft_eval, ctx.seed),
        "preferences": task.build_preference_dataset(s.preference_kind, s.preference_train, s.preference_eval, ctx.seed),
        "prompts": task.build_prompt_dataset(s.prompts_train, s.prompts_eval, ctx.seed),
    }
    for name, data in built.items():
        data.save_to_disk(str(ctx.output_dir(name)))
        ctx.metrics[name] = {split: len(part) for split, part in data.items()}
    ctx.metrics["task_version"] = task.TASK_VERSION
    ctx.metrics["preference_kind"] = s.preference_kind
    log.info("built %s", ctx.metrics)


if __name__ == "__main__":
    stage_main("instructions", run)
