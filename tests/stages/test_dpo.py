"""DPO stage: the loss by hand, summed response log-probs = full-logit log-probs, reference log-probs cached
once (no reference model kept), held-out accuracy / margin rising on synthetic preferences, data and
input-directory errors, and the CLI command."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlhf_fast.models.loading import get_backbone, get_lm_head
from rlhf_fast.stages.data import DatasetFormatError, Rows, load_preference_rows
from rlhf_fast.stages.dpo import (
    DPOConfig,
    DPOTrainer,
    collate_pairs,
    compute_reference_logps,
    dpo_loss,
    load_dpo_rows,
    sequence_logps,
    tokenize_dpo_rows,
    train_dpo,
)
from rlhf_fast.stages.io import StageNotFinishedError, require_finished_stage, save_stage

GOOD = ["good", "fine", "nice", "great", "kind"]
BAD = ["bad", "poor", "awful", "wrong", "sad"]
FILLER = ["the", "of", "and", "time", "people", "water", "house", "light", "world", "river"]


def preference_rows(n: int, seed: int) -> list[dict]:
    """Prompts of filler words; the chosen response uses GOOD words, the rejected one BAD words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(FILLER, k=rng.randint(3, 6)))
        filler = rng.choices(FILLER, k=3)
        chosen = " " + " ".join(filler[:1] + rng.choices(GOOD, k=4) + filler[1:])
        rejected = " " + " ".join(filler[:1] + rng.choices(BAD, k=4) + filler[1:])
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def small_cfg(tmp_path, **kw) -> DPOConfig:
    base = dict(output_dir=str(tmp_path / "dpo"), device="cpu", disable_tqdm=True, per_device_train_batch_size=8,
                per_device_eval_batch_size=16, learning_rate=2e-3, lr_scheduler_type="constant", max_steps=30,
                logging_steps=5, beta=0.1, max_length=64, seed=0)
    base.update(kw)
    return DPOConfig(**base)


# --------------------------------------------------------------------------- math
def test_dpo_loss_hand_worked():
    pc = torch.tensor([-10.0, -5.0, -3.0], requires_grad=True)
    pr = torch.tensor([-12.0, -5.0, -1.0], requires_grad=True)
    rc = torch.tensor([-11.0, -5.0, -3.0])
    rr = torch.tensor([-11.0, -5.0, -3.0])
    beta = 0.5
    out = dpo_loss(pc, pr, rc, rr, beta)
    # logits: 0.5·((1) − (−1)) = 1, 0.5·(0 − 0) = 0, 0.5·(0 − 2) = −1
    want = torch.tensor([math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(1.0))])
    torch.testing.assert_close(out.losses, want)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, 0.0, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5, 0.0, 1.0]))
    assert not out.chosen_rewards.requires_grad
    out.losses.sum().backward()
    # d loss / d pc = −β·(1 − σ(z)), d loss / d pr = +β·(1 − σ(z))
    z = torch.tensor([1.0, 0.0, -1.0])
    torch.testing.assert_close(pc.grad, -beta * (1 - torch.sigmoid(z)))
    torch.testing.assert_close(pr.grad, beta * (1 - torch.sigmoid(z)))
    # stable for huge margins
    big = dpo_loss(torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0]), torch.zeros(2), torch.zeros(2), 1.0).losses
    assert big[0].item() == pytest.approx(0.0, abs=1e-30) and big[1].item() == pytest.approx(1e4)
    with pytest.raises(ValueError, match="ref_rejected must have the shape of policy_chosen"):
        dpo_loss(pc, pr, rc, rr[:2], beta)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(pc, pr, rc, rr, 0.0)


def test_sequence_logps_match_full_logits(make_tiny_lm, tiny_tokenizer):
    model = make_tiny_lm(seed=1)
    rows = load_preference_rows(preference_rows(5, seed=3))
    examples = tokenize_dpo_rows(rows, tiny_tokenizer, max_length=64)
    batch = collate_pairs(examples, tiny_tokenizer.pad_token_id)
    got = sequence_logps(get_backbone(model), get_lm_head(model), batch)
    assert got.shape == (10,) and got.dtype == torch.float32
    # Full-logit reference, one sequence at a time (no padding at all).
    sides = [e.chosen for e in examples] + [e.rejected for e in examples]
    want = []
    for s in sides:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logits = model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        want.append(logp[len(s.prompt_ids) - 1:].sum())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-4)
    # The response boundary is where the tokenizer put it: prompt + response == the pair's full text.
    e = examples[0]
    assert tiny_tokenizer.decode(e.chosen.prompt_ids + e.chosen.response_ids, skip_special_tokens=True) == \
        rows.rows[0]["prompt"] + rows.rows[0]["chosen"]


def test_missing_chosen_or_rejected_names_row_and_fix(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "chosen": " a"}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"prefs.jsonl line 2: missing column 'rejected'.*add the missing column"):
        load_dpo_rows(str(path))
    with pytest.raises(DatasetFormatError, match=r"missing column 'chosen'.*'prompt', 'chosen'"):
        load_dpo_rows([good, {"prompt": "p", "rejected": " b"}])


# --------------------------------------------------------------------------- reference log-probs
def test_reference_logps_cached_once_and_reference_dropped(tmp_path, make_tiny_lm, tiny_tokenizer):
    policy, ref = make_tiny_lm(seed=0), make_tiny_lm(seed=7)
    calls = {"n": 0}
    get_backbone(ref).register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    train, held = preference_rows(24, seed=1), preference_rows(8, seed=2)
    cfg = small_cfg(tmp_path, max_steps=4, logging_steps=2, per_device_eval_batch_size=8)
    trainer = DPOTrainer(cfg, policy, tiny_tokenizer, train, held, ref_model=ref)
    want_train = compute_reference_logps(ref, trainer.train_examples, tiny_tokenizer.pad_token_id, 8)
    calls["n"] = 0
    result = trainer.train()
    assert calls["n"] == 3 + 1  # 24 train pairs + 8 held-out pairs in batches of 8: once each, never again
    assert trainer._ref_model is None  # no reference kept once the log-probs are cached
    torch.testing.assert_close(trainer.ref_train[0], want_train[0])
    torch.testing.assert_close(trainer.ref_train[1], want_train[1])
    assert result.metrics["steps"] == 4 and result.metrics["reference"] == "initial policy"


def test_initial_policy_as_reference_gives_log2_and_zero_rewards(tmp_path, make_tiny_lm, tiny_tokenizer):
    cfg = small_cfg(tmp_path, max_steps=1)
    trainer = DPOTrainer(cfg, make_tiny_lm(seed=0), tiny_tokenizer, preference_rows(16, 1), preference_rows(8, 2))
    trainer.precompute_reference_logps()
    ev = trainer.evaluate()
    assert ev["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert ev["rewards/chosen"] == ev["rewards/rejected"] == ev["rewards/margins"] == 0.0
    assert ev["rewards/accuracies"] == 0.0  # ties count as wrong (TRL)
    assert ev["logps/chosen"] < 0 and ev["logps/rejected"] < 0 and ev["pairs"] == 8


# --------------------------------------------------------------------------- training
def test_training_raises_heldout_accuracy_and_margin(tmp_path, make_tiny_lm, tiny_tokenizer):
    cfg = small_cfg(tmp_path, max_steps=30)
    result = train_dpo(cfg, make_tiny_lm(seed=0), tiny_tokenizer, preference_rows(160, 1), preference_rows(32, 2))
    m = result.metrics
    assert m["initial_eval_accuracy"] == 0.0 and m["initial_eval_margin"] == 0.0
    assert m["final_eval_accuracy"] >= 0.9, m
    assert m["final_eval_margin"] > 0.5, m
    assert m["final_eval_loss"] < math.log(2.0) - 0.2, m
    out = result.output_dir
    assert require_finished_stage(out, stage="dpo")["final_eval_accuracy"] == m["final_eval_accuracy"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert len(train_lines) == 6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "loss", "lr", "grad_norm"):
        assert all(math.isfinite(x[key]) for x in train_lines), key
    assert train_lines[-1]["rewards/margins"] > train_lines[0]["rewards/margins"]
    eval_lines = [x for x in lines if "eval_rewards/accuracies" in x]
    assert eval_lines[0]["eval_loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert eval_lines[-1]["eval_rewards/accuracies"] == m["final_eval_accuracy"]


def test_accumulation_equals_one_big_batch(tmp_path, make_tiny_lm, tiny_tokenizer):
    rows = preference_rows(16, 1)
    common = dict(max_steps=1, learning_rate=1e-2, max_grad_norm=0.0, eval_fraction=0.0)
    one = train_dpo(small_cfg(tmp_path / "a", per_device_train_batch_size=16, **common),
                    make_tiny_lm(seed=0), tiny_tokenizer, rows)
    two = train_dpo(small_cfg(tmp_path / "b", per_device_train_batch_size=8, gradient_accumulation_steps=2, **common),
                    make_tiny_lm(seed=0), tiny_tokenizer, rows)
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)  # Adam: 1st step moves by ~lr = 1e-2
    assert one.metrics["train_loss"] == pytest.approx(two.metrics["train_loss"], rel=1e-5)


# --------------------------------------------------------------------------- input directories + CLI
def test_unfinished_model_dir_refused_plain_dir_allowed(tmp_path, make_tiny_lm, tiny_tokenizer):
    plain = tmp_path / "plain"
    make_tiny_lm(seed=0).save_pretrained(plain)
    tiny_tokenizer.save_pretrained(plain)
    rows = preference_rows(8, 1)
    with pytest.raises(StageNotFinishedError, match="no COMPLETE marker"):
        DPOTrainer(small_cfg(tmp_path, model_name_or_path=str(plain)), train_dataset=rows)
    with pytest.raises(StageNotFinishedError, match="does not exist"):
        DPOTrainer(small_cfg(tmp_path, model_name_or_path=str(tmp_path / "missing")), train_dataset=rows)
    trainer = DPOTrainer(small_cfg(tmp_path, model_name_or_path=str(plain), allow_unmarked_model_dir=True),
                         train_dataset=rows)
    assert trainer.model.config.vocab_size == len(tiny_tokenizer)


def test_cli_dpo_from_sft_stage(tmp_path, make_tiny_lm, tiny_tokenizer, capsys):
    from rlhf_fast.cli import main

    sft = tmp_path / "sft"
    save_stage(make_tiny_lm(seed=0), tiny_tokenizer, sft, {"final_eval_loss": 0.0}, stage="sft")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(24, 1)))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"dpo:\n  model_name_or_path: {sft}\n  dataset: {data}\n  beta: 0.2\n")
    out = tmp_path / "dpo"
    code = main(["dpo", "--config", str(cfg_file), f"output_dir={out}", "device=cpu", "max_steps=2",
                 "per_device_train_batch_size=4", "disable_tqdm=true", "eval_fraction=0.25", "learning_rate=1e-3"])
    assert code == 0
    summary = require_finished_stage(out, stage="dpo")
    assert summary["steps"] == 2 and summary["beta"] == 0.2 and summary["eval_pairs"] == 6
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert "dpo: finished stage directory" in capsys.readouterr().out
    # a dataset row without 'rejected' is a user error naming the row (exit 2, no traceback)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": " a"}) + "\n")
    code = main(["dpo", f"model_name_or_path={sft}", f"dataset={bad}", f"output_dir={tmp_path / 'x'}", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl line 1" in err and "missing column 'rejected'" in err


def test_config_rejects_bad_beta_and_lazy_exports():
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="max_steps > 0 or num_train_epochs > 0"):
        DPOConfig(num_train_epochs=0)
    import rlhf_fast

    assert rlhf_fast.DPOConfig is DPOConfig and rlhf_fast.DPOTrainer is DPOTrainer


def test_bad_cfg_type_and_empty_dataset(tmp_path, make_tiny_lm, tiny_tokenizer):
    with pytest.raises(TypeError, match="cfg must be a DPOConfig"):
        DPOTrainer({"beta": 0.1})
    with pytest.raises(DatasetFormatError, match="empty: no preference rows to train on"):
        DPOTrainer(small_cfg(tmp_path), make_tiny_lm(), tiny_tokenizer, train_dataset=Rows([], [], "empty"))
