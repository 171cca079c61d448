"""The whole pipeline, shrunk to a smoke run (well under a minute), and the PPO stage's input checks."""
import json

import pytest

from rlhf_fast.cli import main as cli_main
from rlhf_fast.stages.pipeline import run_pipeline, split_overrides
from tests.utils import REPO

SMOKE = [
    "sft.max_steps=25", "sft.eval_steps=25", "sft.disable_tqdm=true",
    "pipeline.num_train_pairs=96", "pipeline.num_heldout_pairs=24", "pipeline.num_eval_prompts=16",
    "pipeline.pair_max_new_tokens=16",
    "rm.max_steps=12", "rm.eval_steps=12", "rm.disable_tqdm=true",
    "ppo.total_episodes=32", "ppo.per_device_train_batch_size=16", "ppo.response_length=16",
    "ppo.num_ppo_epochs=1", "ppo.disable_tqdm=true", "ppo.logging_steps=1",
]


def test_pipeline_smoke_writes_every_artifact(tmp_path):
    out = tmp_path / "demo"
    summary = run_pipeline(REPO / "configs" / "demo.yaml", SMOKE + [f"pipeline.output_dir={out}"])
    for key in ("gold_reward_sft", "gold_reward_ppo", "gold_reward_sft_std", "rm_heldout_accuracy", "final_kl",
                "distinct2_sft", "distinct2_ppo", "wall_seconds", "targets"):
        assert key in summary, key
    assert json.loads((out / "summary.json").read_text())["ppo_steps"] == 2
    for name in ("samples_sft.jsonl", "samples_ppo.jsonl", "report.md", "ppo_curves.png", "rm_accuracy.png",
                 "ppo_gold.jsonl", "preference_pairs_train.jsonl", "preference_pairs_heldout.jsonl"):
        assert (out / name).is_file(), name
    for stage in ("sft", "rm", "ppo/model"):
        assert (out / stage / "COMPLETE").is_file(), stage
    # demo.yaml's rm.pooling reaches the saved reward model (which PPO then scored with)
    assert json.loads((out / "rm" / "config.json").read_text())["rlhf_fast_reward_pooling"] == "mean"
    # 96 pairs from 4 samples per prompt: 16 prompts x 6 pairs, fewer only by identical or empty samples
    train_pairs = [json.loads(x) for x in (out / "preference_pairs_train.jsonl").read_text().splitlines()]
    assert 0 < len(train_pairs) <= 96 and len({r["prompt"] for r in train_pairs}) <= 16
    sft = [json.loads(x) for x in (out / "samples_sft.jsonl").read_text().splitlines()]
    ppo = [json.loads(x) for x in (out / "samples_ppo.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in sft] == [r["prompt"] for r in ppo] and len(sft) == 16
    assert (out / "ppo_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "gold judge" in (out / "report.md").read_text().lower()


def test_pipeline_overrides_must_name_their_stage():
    assert split_overrides(["ppo.kl_coef=0.1", "sft.max_steps=3"]) == {"ppo": ["kl_coef=0.1"], "sft": ["max_steps=3"]}
    with pytest.raises(ValueError, match="stage.key=value"):
        split_overrides(["kl_coef=0.1"])
    with pytest.raises(ValueError, match="unknown stage 'dpoo'"):
        split_overrides(["dpoo.beta=0.1"])


def test_ppo_stage_refuses_an_unfinished_sft_directory(tmp_path, capsys):
    half = tmp_path / "sft"
    half.mkdir()
    (half / "config.json").write_text("{}")
    code = cli_main(["ppo", f"sft_model_path={half}", f"reward_model_path={tmp_path / 'rm'}",
                     f"output_dir={tmp_path / 'ppo'}", "use_cpu=true", "bf16=false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "COMPLETE" in err or "not a finished" in err or "unfinished" in err, err


def test_ppo_config_typo_lists_valid_keys(capsys):
    code = cli_main(["ppo", "kl_coeff=0.1", "use_cpu=true"])
    assert code == 2
    assert "kl_coef" in capsys.readouterr().err


def test_preference_pairs_label_every_pair_of_k_samples_per_prompt(make_tiny_lm, tiny_tokenizer):
    from itertools import combinations

    from rlhf_fast.stages.demo_data import gold_prefers, gold_reward
    from rlhf_fast.stages.pipeline import PipelineConfig, pair_prompt_count, preference_pairs, sample_texts

    lm = make_tiny_lm(seed=1)
    prompts = ["The value of a function", "A module is a file", "Each class has"]
    kw = dict(max_new_tokens=12, temperature=1.0, seed=5)
    rows = preference_pairs(lm, tiny_tokenizer, prompts, noisy=False, samples_per_prompt=3, **kw)
    # the k samples of each prompt are the sampler's own streams seed + 7919·j
    samples = [sample_texts(lm, tiny_tokenizer, prompts, max_new_tokens=12, temperature=1.0, seed=5 + 7919 * j)
               for j in range(3)]
    expected = []
    for i, p in enumerate(prompts):
        for x, y in combinations([s[i] for s in samples], 2):
            if x != y and x.strip() and y.strip() and gold_reward(x) != gold_reward(y):
                expected.append((p, *sorted((x, y))))
    assert sorted((r["prompt"], *sorted((r["chosen"], r["rejected"]))) for r in rows) == sorted(expected)
    assert len(expected) >= 4  # random-init samples differ: the check above compared real pairs
    assert all(gold_prefers(r["chosen"], r["rejected"]) for r in rows)  # noiseless: the gold judge's order
    # k = 2 is the original two-sample version (streams seed and seed + 7919)
    two = preference_pairs(lm, tiny_tokenizer, prompts, noisy=False, samples_per_prompt=2, **kw)
    assert {tuple(sorted((r["chosen"], r["rejected"]))) for r in two} <= {tuple(e[1:]) for e in expected}
    assert pair_prompt_count(500, 4) == 84 and pair_prompt_count(500, 2) == 500
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        preference_pairs(lm, tiny_tokenizer, prompts, noisy=True, samples_per_prompt=1, **kw)
    with pytest.raises(ValueError, match="pair_samples_per_prompt must be >= 2"):
        PipelineConfig(pair_samples_per_prompt=1)
