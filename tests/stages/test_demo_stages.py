"""The demo data paths of both stages (dataset=demo, model=demo), shrunk to a couple of steps."""
from __future__ import annotations

from rlhf_fast.stages.io import require_finished_stage
from rlhf_fast.stages.reward import RewardConfig, train_reward_model
from rlhf_fast.stages.sft import SFTConfig, train_sft


def test_demo_sft_then_demo_rm(tmp_path, corpus):
    from rlhf_fast.stages.demo_data import sft_pairs

    sft = train_sft(SFTConfig(output_dir=str(tmp_path / "sft"), device="cpu", disable_tqdm=True, max_steps=2,
                              demo_vocab_size=300, per_device_train_batch_size=4))
    m = sft.metrics
    assert m["dataset"] == "demo train pairs" and m["train_examples"] == len(sft_pairs(corpus.train))
    assert m["eval_examples"] == len(sft_pairs(corpus.heldout))  # held-out paragraphs, not a split of train
    assert len(sft.tokenizer) == 300 and sft.model.config.hidden_size == 128
    rm = train_reward_model(RewardConfig(model_name_or_path=str(sft.output_dir), output_dir=str(tmp_path / "rm"),
                                         device="cpu", disable_tqdm=True, max_steps=2, demo_num_pairs=40,
                                         per_device_train_batch_size=4))
    assert rm.metrics["train_pairs"] == 36 and rm.metrics["eval_pairs"] == 4
    assert require_finished_stage(rm.output_dir, stage="rm")["dataset"] == "demo preference pairs"
