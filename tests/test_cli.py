"""The rlhf-fast console script: subcommands, --config sections, typed overrides, errors, registry."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_fast import cli

DEMO_YAML = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def test_console_script_is_declared():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'rlhf-fast = "rlhf_fast.cli:main"' in text


def test_print_config_resolves_yaml_and_overrides(capsys):
    assert cli.main(["sft", "--config", DEMO_YAML, "--print-config", "max_steps=3", "learning_rate=1e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["sft"]
    assert printed["max_steps"] == 3 and printed["learning_rate"] == 1e-4
    assert printed["output_dir"] == "runs/demo/sft"  # from the file
    assert cli.main(["rm", "--print-config", "eval_steps=null"]) == 0  # no --config: defaults + overrides
    assert yaml.safe_load(capsys.readouterr().out)["rm"]["eval_steps"] is None


def test_typo_lists_valid_keys_and_exits_2(capsys):
    assert cli.main(["sft", "--config", DEMO_YAML, "learning_rat=1e-4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-fast sft: error: unknown config key 'learning_rat'")
    assert "Did you mean 'learning_rate'" in err and "per_device_train_batch_size" in err
    assert "Traceback" not in err
    assert cli.main(["rm", "max_steps=many"]) == 2
    assert "cannot use 'many' as int" in capsys.readouterr().err


def test_unfinished_input_stage_is_an_error_naming_the_directory(tmp_path, capsys):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    code = cli.main(["rm", f"model_name_or_path={tmp_path / 'sft'}", f"output_dir={tmp_path / 'rm'}", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "sft") in err and "COMPLETE" in err
    assert not (tmp_path / "rm").exists()


def test_help_lists_commands_and_config_keys(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "sft" in out and "rm" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["rm", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config FILE.yaml" in out and "key=value" in out
    assert "center_rewards_coefficient (float | None, default None)" in out


def test_unknown_command_suggests(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sfy"])
    assert e.value.code == 2
    assert "unknown command 'sfy'. Did you mean 'sft'?" in capsys.readouterr().err


def test_bench_is_not_a_command(capsys):
    """The benchmarks live in the checkout, not the wheel: `make bench` / `python -m benchmarks.run_all`."""
    assert "bench" not in cli.COMMANDS
    with pytest.raises(SystemExit) as e:
        cli.main(["bench"])
    assert e.value.code == 2
    assert "unknown command 'bench'" in capsys.readouterr().err


def test_register_command_and_stage_command(capsys, tmp_path):
    from dataclasses import dataclass

    @dataclass
    class EchoConfig:
        n: int = 1
        word: str = "hi"

    seen = {}
    cli.register_stage_command("echo", EchoConfig, "echo", lambda cfg: seen.setdefault("cfg", cfg) and 0, help="echo")
    cli.register_command("hello", "say hello", lambda p: p.add_argument("--name", default="x"),
                         lambda args: print(f"hello {args.name}") or 3)
    try:
        cfg_file = tmp_path / "c.yaml"
        cfg_file.write_text("echo:\n  n: 4\n")
        assert cli.main(["echo", "--config", str(cfg_file), "word=yo"]) == 0
        assert seen["cfg"] == EchoConfig(n=4, word="yo")
        assert cli.main(["hello", "--name", "bob"]) == 3
        assert "hello bob" in capsys.readouterr().out
        with pytest.raises(ValueError, match="already registered"):
            cli.register_command("hello", "again", lambda p: None, lambda a: 0)
    finally:
        cli.COMMANDS.pop("echo", None)
        cli.COMMANDS.pop("hello", None)


def test_sft_then_rm_end_to_end_through_the_cli(tmp_path, capsys):
    """The demo's two stages, shrunk: `rlhf-fast sft` writes a finished dir that `rlhf-fast rm` loads."""
    sft_out, rm_out = tmp_path / "sft", tmp_path / "rm"
    rows = [{"prompt": f"Question {i}:", "response": f" the function returns {i}"} for i in range(12)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["sft", "--config", DEMO_YAML, f"dataset={data}", f"output_dir={sft_out}", "max_steps=2",
                     "demo_vocab_size=300", "device=cpu", "disable_tqdm=true", "eval_steps=null"]) == 0
    assert json.loads((sft_out / "COMPLETE").read_text())["stage"] == "sft"
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": "q", "chosen": " code", "rejected": " no", "margin": 0.1}) + "\n"
                             for _ in range(6)))
    assert cli.main(["rm", "--config", DEMO_YAML, f"model_name_or_path={sft_out}", f"dataset={prefs}",
                     f"output_dir={rm_out}", "max_steps=2", "device=cpu", "disable_tqdm=true", "eval_fraction=0.2"]) == 0
    summary = json.loads((rm_out / "COMPLETE").read_text())
    assert summary["stage"] == "rm" and summary["train_pairs"] == 5 and summary["eval_pairs"] == 1
    assert "finished stage directory" in capsys.readouterr().out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "sft", "--print-config", "seed=7"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["sft"]["seed"] == 7


def test_output_dir_that_is_not_a_stage_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert cli.main(["sft", f"output_dir={tmp_path}", "device=cpu"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "refusing to replace it" in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("key, what", [("model_name_or_path", "model"), ("tokenizer_name_or_path", "tokenizer")])
def test_missing_model_or_tokenizer_path_is_one_line(tmp_path, capsys, key, what):
    from tests.trainer.tiny import make_tokenizer, tiny_policy

    tiny_policy(32).save_pretrained(tmp_path / "model")  # a real local model directory, with no tokenizer
    make_tokenizer(32).save_pretrained(tmp_path / "model")
    argv = ["sft", f"output_dir={tmp_path / 'out'}", f"model_name_or_path={tmp_path / 'model'}",
            f"{key}={tmp_path / 'nonexistent'}"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "it/s]" not in line]  # progress bars
    assert err == [f"rlhf-fast sft: error: {what} path '{tmp_path / 'nonexistent'}' does not exist (no such directory)"]


def test_ppo_on_a_machine_without_cuda_defaults_to_cpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["ppo", "--print-config"]) == 0
    out = capsys.readouterr()
    printed = yaml.safe_load(out.out)["ppo"]
    assert printed["use_cpu"] is True and printed["bf16"] is False
    assert "no CUDA device: defaulting to use_cpu=true bf16=false" in out.err
    assert cli.main(["ppo", "--print-config", "bf16=false", "use_cpu=false"]) == 0  # explicit values win
    assert yaml.safe_load(capsys.readouterr().out)["ppo"]["use_cpu"] is False
