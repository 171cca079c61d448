"""TRL's GRPO quickstart shape (examples/trl_grpo_script.py) runs with only its import line changed, and logs
the metric names trl 1.16 logs when it runs the unchanged script (in its cached environment)."""
import json
import os
import subprocess

import pytest

from tests.trainer.test_trl_dropin import changed_lines, load_migrated
from tests.utils import REPO

SCRIPT = REPO / "examples" / "trl_grpo_script.py"
TRL_IMPORT = "from trl import GRPOConfig, GRPOTrainer"
OUR_IMPORT = "from rlhf_fast import GRPOConfig, GRPOTrainer"
ARGS = ["--vocab_size", "64", "--num_prompts", "16", "--use_cpu", "--bf16", "False", "--per_device_train_batch_size",
        "8", "--num_generations", "4", "--max_completion_length", "8", "--max_steps", "2", "--logging_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--learning_rate", "1e-3"]


def test_only_the_import_line_changes():
    assert changed_lines(SCRIPT, TRL_IMPORT, OUR_IMPORT) == [f"-{TRL_IMPORT}  # the one line a migration changes",
                                                             f"+{OUR_IMPORT}  # the one line a migration changes"]


def run_migrated(tmp_path):
    mod = load_migrated(tmp_path, "grpo_script_rlhf_fast", SCRIPT, TRL_IMPORT, OUR_IMPORT)
    return mod.main(["--model_dir", str(tmp_path / "model"), "--output_dir", str(tmp_path / "ours"), *ARGS])


TRL_RUN = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("script", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
t = mod.main(sys.argv[2:])
print("KEYS=" + json.dumps([sorted(h) for h in t.state.log_history]))
"""


@pytest.mark.slow
def test_migrated_script_trains_saves_and_logs_trls_metric_names(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.trainer.grpo_parity import trl_python

    trainer = run_migrated(tmp_path)
    assert type(trainer).__module__ == "rlhf_fast.trainer.grpo" and trainer.state.global_step == 2
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert saved.config.vocab_size == 64
    ours = [sorted(h) for h in trainer.state.log_history]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([trl_python(), "-c", TRL_RUN, str(SCRIPT), "--model_dir", str(tmp_path / "model"),
                           "--output_dir", str(tmp_path / "trl"), *ARGS], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trl = json.loads(proc.stdout.split("KEYS=")[-1])
    assert ours == trl  # per-step entries and the final train summary: the same names, entry by entry
    assert {"reward", "reward_std", "rewards/reward_len/mean", "rewards/reward_format/std", "completions/mean_length",
            "completions/clipped_ratio", "entropy", "clip_ratio/region_mean", "frac_reward_zero_std", "num_tokens",
            "learning_rate", "loss", "grad_norm"} <= set(ours[0])
