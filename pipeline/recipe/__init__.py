"""Recipes: one YAML file -> a typed, resolved `Recipe` (strict; imports no torch, so parsing is fast).

    from pipeline.recipe import load_recipe, ConfigError
    recipe = load_recipe("recipes/tiny.yaml", ["stages.pretrain.max_steps=10"])
    recipe.settings["pretrain"].max_steps      # 10: a typed PretrainSettings
    recipe.inputs["pretrain"]["data"].path     # where the prepare stage publishes its dataset
    recipe.order()                             # stage names in dependency order

Modules: `config` (the YAML -> dataclass mechanism: `from_dict`, `ConfigError` naming the key path),
`schema` (`Recipe`, inputs, `base:` variants, overrides), `settings` (model, training loop and push
settings shared by stages), `ppo_settings` (PPO's algorithm), `stages` (one settings class per stage
type, which is also the stage's declaration, and `STAGE_TYPES`). Every settings field is documented by the
docstring under it.
"""

from pipeline.recipe.config import ConfigError, from_dict, to_dict
from pipeline.recipe.schema import InputSpec, Recipe, load_recipe, parse_recipe
from pipeline.recipe.settings import ModelSettings, PushSettings, TrainSettings
from pipeline.recipe.stages import STAGE_TYPES, StageSettings

__all__ = ["ConfigError", "InputSpec", "ModelSettings", "PushSettings", "Recipe", "STAGE_TYPES", "StageSettings",
           "TrainSettings", "from_dict", "load_recipe", "parse_recipe", "to_dict"]
