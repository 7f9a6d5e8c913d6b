"""Recipes parse strictly: every mistake names its key path, before anything runs."""

from pathlib import Path

import pytest
import yaml

from pipeline.recipe.config import ConfigError
from pipeline.recipe.schema import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = {"inputs": {"corpus": "builtin:stdlib"}, "vocab_size": 512}


def parse(data: dict, overrides=None):
    return parse_recipe({"run_dir": "runs/x", **data}, None, overrides)


def error_of(data: dict, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        parse(data, overrides)
    return str(e.value)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_resolves(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    r = load_recipe(recipe)
    assert r.order(), "a recipe without stages"
    for name in r.order():
        for spec in r.inputs[name].values():
            assert spec.kind in ("stage", "builtin", "hub", "path")


def test_unknown_key_names_full_path_and_suggests():
    msg = error_of({"stages": {"tokenizer": {**TOKENIZER, "vocab_sizze": 10}}})
    assert msg == "stages.tokenizer.vocab_sizze: unknown key; did you mean vocab_size?"


def test_unknown_top_level_key_and_model_key():
    assert error_of({"sede": 1, "stages": {"tokenizer": TOKENIZER}}).startswith("sede: unknown key; did you mean seed?")
    assert error_of({"model": {"famly": "dense"}, "stages": {"tokenizer": TOKENIZER}}).startswith("model.famly: unknown key")


def test_wrong_type_and_bad_value_name_the_key():
    assert error_of({"stages": {"tokenizer": {**TOKENIZER, "vocab_size": "big"}}}) == \
        "stages.tokenizer.vocab_size: expected an integer, got 'big'"
    assert error_of({"stages": {"tokenizer": {**TOKENIZER, "vocab_size": 10}}}).startswith("stages.tokenizer.vocab_size: must be at least 300")
    assert error_of({"model": {"family": "mo"}, "stages": {"tokenizer": TOKENIZER}}).startswith("model.family: 'mo' is not one of dense, moe")
    assert "stages.prepare.block_size: 4096 exceeds" in error_of({
        "model": {"max_seq_len": 1024},
        "stages": {"tokenizer": TOKENIZER, "prepare": {"inputs": {"tokenizer": "tokenizer.tokenizer"}, "block_size": 4096}}})


def test_missing_required_key():
    assert error_of({"stages": {"tokenizer": TOKENIZER}, "run_dir": None}).startswith("run_dir:")
    with pytest.raises(ConfigError, match="^run_dir: required key is missing"):
        parse_recipe({"stages": {"tokenizer": TOKENIZER}})


def test_unknown_stage_and_missing_input():
    assert error_of({"stages": {"tokeniser": TOKENIZER}}) == "stages.tokeniser: unknown stage; did you mean tokenizer?"
    assert error_of({"stages": {"tokenizer": TOKENIZER, "prepare": {}}}) == \
        "stages.prepare.inputs.tokenizer: required input is missing (tokenizer)"


def test_unknown_stage_reference_and_output():
    msg = error_of({"stages": {"tokenizer": TOKENIZER, "prepare": {"inputs": {"tokenizer": "tokenizr.tokenizer"}}}})
    assert msg.startswith("stages.prepare.inputs.tokenizer: 'tokenizr.tokenizer' references stage 'tokenizr'")
    msg = error_of({"stages": {"tokenizer": TOKENIZER, "prepare": {"inputs": {"tokenizer": "tokenizer.model"}}}})
    assert msg == "stages.prepare.inputs.tokenizer: stage 'tokenizer' has no output 'model'; it produces tokenizer"


def test_missing_input_path(tmp_path):
    msg = error_of({"stages": {"tokenizer": {"inputs": {"corpus": str(tmp_path / "nope.txt")}}}})
    assert msg.startswith("stages.tokenizer.inputs.corpus: path") and "nope.txt does not exist" in msg


def test_reference_cycle_is_rejected():
    msg = error_of({"stages": {"tokenizer": {"inputs": {"corpus": "prepare.dataset"}},
                               "prepare": {"inputs": {"tokenizer": "tokenizer.tokenizer"}}}})
    assert msg.startswith("stages: reference cycle") and "tokenizer" in msg and "prepare" in msg


def test_dependency_order_and_input_kinds(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n\nsecond document")
    r = parse({"stages": {"prepare": {"inputs": {"tokenizer": "tokenizer.tokenizer", "corpus": str(corpus)}},
                          "tokenizer": {"inputs": {"corpus": "hub:someone/texts@main"}}}})
    assert r.order() == ["tokenizer", "prepare"]
    assert r.inputs["prepare"]["corpus"].kind == "path" and r.inputs["prepare"]["corpus"].path == corpus
    assert r.inputs["tokenizer"]["corpus"].kind == "hub"
    assert r.inputs["prepare"]["tokenizer"].path == Path("runs/x").resolve() / "tokenizer" / "tokenizer"


def test_dotted_overrides_are_typed_and_strict():
    r = parse({"stages": {"tokenizer": TOKENIZER}}, ["stages.tokenizer.vocab_size=1024", "seed=7"])
    assert r.settings["tokenizer"].vocab_size == 1024 and r.seed == 7
    assert error_of({"stages": {"tokenizer": TOKENIZER}}, ["stages.tokenizer.vocab_sise=1"]).startswith(
        "stages.tokenizer.vocab_sise: unknown key")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse({"stages": {"tokenizer": TOKENIZER}}, ["stages.tokenizer.vocab_size"])


def test_exponent_floats_that_yaml_reads_as_strings_are_numbers():
    # PyYAML (YAML 1.1) reads `validation_fraction: 5e-2` as the string '5e-2'; it must still mean 0.05
    section = {**TOKENIZER, **yaml.safe_load("validation_fraction: 5e-2")}
    assert section["validation_fraction"] == "5e-2"
    assert parse({"stages": {"tokenizer": section}}).settings["tokenizer"].validation_fraction == 0.05
    r = parse({"stages": {"tokenizer": TOKENIZER}}, ["stages.tokenizer.validation_fraction=2.5E-2"])
    assert r.settings["tokenizer"].validation_fraction == 0.025
    assert error_of({"stages": {"tokenizer": {**TOKENIZER, "validation_fraction": "2e-4x"}}}) == \
        "stages.tokenizer.validation_fraction: expected a number, got '2e-4x'"


def test_cli_reports_recipe_errors_with_exit_code(tmp_path, write_recipe):
    from conftest import run_cli

    path = write_recipe({"stages": {"tokenizer": {**TOKENIZER, "max_stepz": 3}}})
    for command in ("plan", "run"):
        out = run_cli("pipeline", command, str(path))
        assert out.returncode == 2
        assert "stages.tokenizer.max_stepz: unknown key" in out.stderr
    assert not (tmp_path / "run").exists(), "nothing may run or be created for a bad recipe"
    out = run_cli("pipeline", "plan", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "missing.yaml does not exist" in out.stderr
    assert yaml.safe_load(path.read_text())["stages"]["tokenizer"]["max_stepz"] == 3


def test_base_recipe_is_merged_and_the_variant_wins(tmp_path):
    base = {"run_dir": "runs/a", "seed": 3, "model": {"family": "dense", "size": "nano"},
            "stages": {"tokenizer": TOKENIZER}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "run_dir": "runs/b",
                                                       "model": {"family": "moe"}}))
    r = load_recipe(tmp_path / "moe.yaml")
    assert r.model.family == "moe" and r.model.size == "nano" and r.seed == 3  # mappings merge key by key
    assert r.run_path.name == "b" and r.settings["tokenizer"].vocab_size == 512


def test_shipped_moe_variant_differs_from_tiny_only_in_model_and_run_dir(monkeypatch):
    monkeypatch.chdir(ROOT)
    tiny, moe = load_recipe(ROOT / "recipes/tiny.yaml"), load_recipe(ROOT / "recipes/tiny-moe.yaml")
    assert moe.model.family == "moe" and tiny.model.family == "dense" and moe.run_path != tiny.run_path
    assert moe.settings == tiny.settings


def test_missing_or_cyclic_base_names_the_key(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"base": "nowhere.yaml", "run_dir": "x"}))
    with pytest.raises(ConfigError, match=r"^base: recipe .*nowhere.yaml does not exist"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "c.yaml"}))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "b.yaml"}))
    with pytest.raises(ConfigError, match=r"^base: b.yaml makes a cycle \(b.yaml -> c.yaml -> b.yaml\)"):
        load_recipe(tmp_path / "b.yaml")


def test_muon_with_a_deepspeed_launch_config_is_rejected_naming_the_key():
    stages = {"tokenizer": TOKENIZER,
              "prepare": {"inputs": {"tokenizer": "tokenizer.tokenizer"}},
              "pretrain": {"inputs": {"data": "prepare.dataset", "tokenizer": "tokenizer.tokenizer"},
                           "optimizer": "muon"}}
    zero2 = str(ROOT / "recipes" / "accelerate" / "cpu_zero2.yaml")
    assert parse({"stages": stages}).settings["pretrain"].optimizer == "muon"  # single process: fine
    ddp = parse({"stages": stages}, [f"stages.pretrain.launch.config_file={ROOT / 'recipes/accelerate/cpu_ddp.yaml'}"])
    assert ddp.settings["pretrain"].optimizer == "muon"
    msg = error_of({"stages": stages}, [f"stages.pretrain.launch.config_file={zero2}"])
    assert msg.startswith("stages.pretrain.optimizer: muon needs whole weight matrices") and "cpu_zero2.yaml" in msg
    assert error_of({"stages": stages}, ["stages.pretrain.optimizer=lion"]).startswith(
        "stages.pretrain.optimizer: 'lion' is not one of adamw, muon")


def test_hub_inputs_take_a_config_and_a_revision():
    from pipeline.recipe.schema import parse_hub_spec

    assert parse_hub_spec("hub:trl-lib/ultrafeedback_binarized") == ("trl-lib/ultrafeedback_binarized", None, None)
    assert parse_hub_spec("hub:allenai/c4:en@refs/convert/parquet") == ("allenai/c4", "en", "refs/convert/parquet")
    assert parse_hub_spec("hub:gpt2@main") == ("gpt2", None, "main")
    stages = {"tokenizer": {"inputs": {"corpus": "hub:allenai/c4:en@main"}}}
    assert parse({"stages": stages}).inputs["tokenizer"]["corpus"].kind == "hub"
    stages["tokenizer"]["inputs"]["corpus"] = "hub:allenai/c4:en:extra"
    assert "is not a hub name like hub:ORG/NAME, hub:ORG/NAME:CONFIG" in error_of({"stages": stages})
