"""A TRL-1.12-style PPO script runs with only its import line changed."""
import difflib
import importlib.util
import sys
from pathlib import Path

import torch

from tests.utils import REPO

SCRIPT = REPO / "examples" / "trl_ppo_script.py"
TRL_IMPORT = "from trl.experimental.ppo import PPOConfig, PPOTrainer"
OUR_IMPORT = "from rlhf_fast import PPOConfig, PPOTrainer"


def migrated_source(script=SCRIPT, trl_import=TRL_IMPORT, our_import=OUR_IMPORT) -> str:
    """The script's source with its one TRL import line replaced by ours."""
    src = script.read_text()
    line = f"\n{trl_import}  #"
    assert src.count(line) == 1
    return src.replace(line, f"\n{our_import}  #")


def changed_lines(script=SCRIPT, trl_import=TRL_IMPORT, our_import=OUR_IMPORT) -> list[str]:
    old, new = script.read_text().splitlines(), migrated_source(script, trl_import, our_import).splitlines()
    return [line for line in difflib.unified_diff(old, new, lineterm="", n=0)
            if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]


def load_migrated(tmp_path, name: str, script=SCRIPT, trl_import=TRL_IMPORT, our_import=OUR_IMPORT):
    """The migrated script imported as a module (its main() not yet called)."""
    path = tmp_path / f"{name}.py"
    path.write_text(migrated_source(script, trl_import, our_import))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_only_the_import_line_changes():
    assert changed_lines() == [f"-{TRL_IMPORT}  # the one line a migration changes",
                               f"+{OUR_IMPORT}  # the one line a migration changes"]


def test_migrated_script_trains_saves_and_samples(tmp_path):
    mod = load_migrated(tmp_path, "ppo_script_rlhf_fast")
    out = tmp_path / "out"
    trainer = mod.main([
        "--model_dir", str(tmp_path / "models"), "--vocab_size", "64", "--num_prompts", "24",
        "--output_dir", str(out), "--use_cpu", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--total_episodes", "16", "--response_length", "6",
        "--num_ppo_epochs", "1", "--stop_token", "eos", "--missing_eos_penalty", "1.0", "--report_to", "none",
        "--save_strategy", "no", "--num_sample_generations", "0", "--bf16", "False", "--disable_tqdm", "True",
    ])
    assert type(trainer).__module__ == "rlhf_fast.trainer.ppo"
    assert trainer.state.global_step == 2 and trainer.critic_mode == "separate"
    assert {"objective/kl", "objective/scores", "loss/value_avg"} <= set(trainer.state.log_history[-1])
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(saved.get_output_embeddings().weight, trainer.model.lm_head.weight.detach())
    assert (Path(out) / "completions.jsonl").is_file()
