"""rlhf_fast.stages.config: YAML sections + key=value overrides, typed and checked, for any dataclass."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import pytest

from rlhf_fast.stages.config import (
    ConfigError,
    coerce_value,
    config_to_dict,
    load_stage_config,
    parse_overrides,
)


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class ToyConfig:
    learning_rate: float = 1e-3
    batch_size: int = 8
    use_bf16: bool = False
    name: str = "toy"
    eval_steps: int | None = None
    tags: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=lambda: [1, 2])
    schedule: Literal["cosine", "linear"] = "cosine"
    mode: Mode = Mode.FAST
    extra: dict | None = None
    ratio_or_auto: float | str = "auto"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "sft:\n"
        "  learning_rate: 1e-4        # PyYAML reads this as a *string*\n"
        "  batch_size: 4\n"
        "  tags: [a, b]\n"
        "rm:\n"
        "  use_bf16: yes\n"
        "  eval_steps: null\n"
    )
    return path


def test_yaml_section_then_overrides(yaml_file):
    cfg = load_stage_config(ToyConfig, yaml_file, "sft", ["batch_size=16", "use_bf16=true", "name=run1"])
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == 16  # the override wins over the file
    assert cfg.use_bf16 is True and cfg.name == "run1" and cfg.tags == ["a", "b"]
    rm = load_stage_config(ToyConfig, yaml_file, "rm")
    assert rm.use_bf16 is True and rm.eval_steps is None and rm.batch_size == 8


def test_defaults_keyword_arguments_are_lowest_priority(yaml_file):
    cfg = load_stage_config(ToyConfig, yaml_file, "sft", ["name=cli"], name="kw", batch_size=2)
    assert cfg.name == "cli" and cfg.batch_size == 4  # file beats keyword defaults, override beats file


def test_values_parsed_to_field_types():
    cfg = load_stage_config(ToyConfig, overrides=[
        "learning_rate=3", "batch_size=1_024", "eval_steps=None", "tags=x,y,z", "widths=[3, 4]",
        "schedule=linear", "mode=slow", 'extra={"k": 1}', "ratio_or_auto=0.5", "use_bf16=0",
    ])
    assert cfg.learning_rate == 3.0 and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == 1024 and cfg.eval_steps is None
    assert cfg.tags == ["x", "y", "z"] and cfg.widths == [3, 4]
    assert cfg.schedule == "linear" and cfg.mode is Mode.SLOW and cfg.extra == {"k": 1}
    assert cfg.ratio_or_auto == 0.5 and cfg.use_bf16 is False
    assert load_stage_config(ToyConfig, overrides=["ratio_or_auto=auto"]).ratio_or_auto == "auto"
    assert load_stage_config(ToyConfig, overrides=["eval_steps=12"]).eval_steps == 12
    # a string field keeps "none" as a value (transformers' report_to=none); null means None
    assert coerce_value("none", str | None) == "none" and coerce_value("null", str | None) is None
    assert coerce_value("none", int | None) is None


@pytest.mark.parametrize("override, fragment", [
    ("batch_size=eight", "'batch_size'"),
    ("batch_size=2.5", "expected an integer"),
    ("use_bf16=maybe", "true/false"),
    ("schedule=cosin", "'cosine', 'linear'"),
    ("mode=medium", "'fast', 'slow'"),
    ("learning_rate=fast", "expected a number"),
])
def test_bad_values_name_the_key_and_type(override, fragment):
    with pytest.raises(ConfigError, match="cannot use") as e:
        load_stage_config(ToyConfig, overrides=[override])
    assert fragment in str(e.value)
    assert override.split("=")[0] in str(e.value)


def test_override_typo_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_stage_config(ToyConfig, overrides=["learning_rat=1e-4"])
    msg = str(e.value)
    assert "unknown config key 'learning_rat'" in msg and "command-line overrides" in msg
    assert "Did you mean 'learning_rate'" in msg
    for key in ("batch_size", "use_bf16", "widths", "ratio_or_auto"):
        assert key in msg


def test_yaml_typo_names_file_and_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_stage_config(ToyConfig, path, "sft")
    assert str(path) in str(e.value) and "'sft'" in str(e.value) and "'batch_size'" in str(e.value)


def test_file_and_section_errors(tmp_path, yaml_file):
    with pytest.raises(ConfigError, match="does not exist"):
        load_stage_config(ToyConfig, tmp_path / "missing.yaml", "sft")
    with pytest.raises(ConfigError, match=r"no 'ppo' section \(sections present: 'sft', 'rm'\)"):
        load_stage_config(ToyConfig, yaml_file, "ppo")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  a: [1, 2\n  b: 3\n")
    with pytest.raises(ConfigError, match="line .* not valid YAML"):
        load_stage_config(ToyConfig, bad, "sft")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("sft:\n  - 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_stage_config(ToyConfig, not_mapping, "sft")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["batch_size"])


def test_post_init_validation_becomes_config_error():
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        load_stage_config(ToyConfig, overrides=["batch_size=0"])


def test_stage_configs_load_from_the_demo_file():
    from rlhf_fast.stages.reward import RewardConfig
    from rlhf_fast.stages.sft import SFTConfig

    sft = load_stage_config(SFTConfig, "configs/demo.yaml", "sft", ["max_steps=7"])
    assert sft.max_steps == 7 and sft.model_name_or_path == "demo" and sft.learning_rate == 3e-3
    rm = load_stage_config(RewardConfig, "configs/demo.yaml", "rm")
    assert rm.model_name_or_path == sft.output_dir
    assert config_to_dict(sft)["max_steps"] == 7
    with pytest.raises(ConfigError, match="per_device_train_batch_size must be >= 1"):
        load_stage_config(SFTConfig, overrides=["per_device_train_batch_size=0"])
    with pytest.raises(ConfigError, match="'cosine', 'linear', 'constant'"):
        load_stage_config(RewardConfig, overrides=["lr_scheduler_type=step"])


def test_works_for_a_transformers_training_arguments_subclass():
    """The PPO stage passes a TrainingArguments subclass: many fields, enums, unions, dicts."""
    from transformers import TrainingArguments

    @dataclass
    class Sub(TrainingArguments):
        kl_coef: float = 0.05

    cfg = load_stage_config(Sub, overrides=[
        "output_dir=/tmp/x", "kl_coef=0.1", "learning_rate=1e-5", "lr_scheduler_type=linear", "report_to=none",
        "use_cpu=true", "eval_steps=none", 'lr_scheduler_kwargs={"a": 1}',
    ])
    assert cfg.kl_coef == 0.1 and cfg.learning_rate == 1e-5 and cfg.lr_scheduler_type.value == "linear"
    assert cfg.report_to in ([], "none", ["none"]) and cfg.eval_steps is None and cfg.lr_scheduler_kwargs == {"a": 1}
    with pytest.raises(ConfigError, match="Did you mean 'kl_coef'"):
        load_stage_config(Sub, overrides=["output_dir=/tmp/x", "kl_cof=1"])
