import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_overrides_defaults_and_command_line_overrides_yaml(tmp_path):
    recipe = write(tmp_path, "train:\n  epochs: 7\n  batch_size: 64\n")
    cfg = load_config(recipe, ["train.epochs=3"])
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 64
    assert cfg.optim.momentum == 0.9  # schema default


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(recipe):
    load_config(recipe)


def test_paper_recipe_for_densenet121():
    cfg = load_config(ROOT / "configs/densenet121.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (90, 256, 0.1)
    assert cfg.optim.nesterov and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    assert (cfg.schedule.name, list(cfg.schedule.milestones), cfg.schedule.gamma) == ("step", [30, 60], 0.1)


def test_misspelled_key_in_a_file_names_the_key_the_file_and_the_nearest_key(tmp_path):
    recipe = write(tmp_path, "train:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    message = str(err.value)
    assert "train.epocs" in message and str(recipe) in message and "train.epochs" in message


def test_misspelled_section_suggests_the_section(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean: train"):
        load_config(write(tmp_path, "trian:\n  epochs: 3\n"))


def test_misspelled_key_on_the_command_line_names_the_command_line():
    with pytest.raises(ConfigError, match="train.epocs.*command-line.*train.epochs"):
        load_config(None, ["train.epocs=3"])


def test_key_in_the_wrong_section_suggests_the_right_one():
    with pytest.raises(ConfigError, match="Did you mean: train.epochs"):
        load_config(None, ["epochs=3"])


def test_wrong_type_names_the_key_and_the_expected_type():
    with pytest.raises(ConfigError, match="'train.epochs'.*expects int"):
        load_config(None, ["train.epochs=many"])


@pytest.mark.parametrize("word,allowed", [("train.precision=fp8", "bf16, fp16, fp32"),
                                          ("schedule.name=linear", "step, cosine"),
                                          ("model.name=resnet50", "densenet121"),
                                          ("data.auto_augment=randaugment", "none, ra, ta_wide, imagenet")])
def test_value_outside_the_choices_names_what_is_allowed(word, allowed):
    with pytest.raises(ConfigError, match=allowed):
        load_config(None, [word])


@pytest.mark.parametrize("word,key", [("train.batch_size=0", "train.batch_size"),
                                      ("optim.lr=-0.1", "optim.lr"),
                                      ("train.label_smoothing=1.5", "train.label_smoothing"),
                                      ("schedule.warmup_epochs=100", "schedule.warmup_epochs"),
                                      ("data.ra_magnitude=31", "data.ra_magnitude"),
                                      ("data.ra_num_ops=0", "data.ra_num_ops"),
                                      ("data.magnitude_bins=1", "data.magnitude_bins"),
                                      ("data.random_erase=1.5", "data.random_erase")])
def test_out_of_range_values_name_the_key(word, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [word])


def test_nesterov_without_momentum_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"'optim.nesterov' is true but 'optim.momentum' is 0.0"):
        load_config(None, ["optim.momentum=0"])
    assert load_config(None, ["optim.momentum=0", "optim.nesterov=false"]).optim.momentum == 0


def test_reading_too_many_batches_ahead_is_refused_naming_the_limit():
    with pytest.raises(ConfigError, match=r"'data.read_ahead' is 1000: at most 16 batches"):
        load_config(None, ["data.read_ahead=1000"])
    assert load_config(None, ["data.read_ahead=16"]).data.read_ahead == 16


def test_densenet_bc_depth_must_be_6n_plus_4():
    with pytest.raises(ConfigError, match="model.depth"):
        load_config(None, ["model.name=densenet_bc", "model.depth=41"])


def test_word_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_run_dir_interpolation_is_resolved():
    cfg = load_config(None, ["model.name=densenet169"])
    assert cfg.run.dir == "runs/densenet169"


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_print_config_prints_the_resolved_config_and_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(str(ROOT / "configs/mini.yaml"), f"run.dir={run_dir}", "train.epochs=2", "--print-config",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.train.epochs == 2 and printed.run.dir == str(run_dir)
    assert not run_dir.exists()


def test_invalid_config_exits_with_a_message_and_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(str(ROOT / "configs/mini.yaml"), f"run.dir={run_dir}", "train.precison=bf16", cwd=tmp_path)
    assert result.returncode == 2
    assert "train.precison" in result.stderr and "train.precision" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()
