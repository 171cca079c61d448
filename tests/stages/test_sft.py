"""SFT stage: loss on response tokens through the fused op, accumulation, held-out loss goes down, outputs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_fast.models.loading import get_backbone, get_lm_head
from rlhf_fast.stages.base import response_logprobs
from rlhf_fast.stages.data import collate_sft, load_sft_rows, tokenize_sft_rows
from rlhf_fast.stages.demo_data import sft_pairs
from rlhf_fast.stages.io import require_finished_stage, save_stage
from rlhf_fast.stages.sft import SFTConfig, train_sft
from rlhf_fast.testing import AllocationTracker


def quiet_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "sft"), device="cpu", disable_tqdm=True, logging_steps=5, seed=0)
    base.update(kw)
    return SFTConfig(**base)


def test_response_logprobs_match_the_full_logits(make_tiny_lm, tiny_tokenizer):
    model = make_tiny_lm(seed=1)
    rows = load_sft_rows([{"prompt": "The function", "response": " returns a value"},
                          {"prompt": "A class may define a method that", "response": " is called"},
                          {"prompt": "x", "response": " y z"}])
    examples = tokenize_sft_rows(rows, tiny_tokenizer)
    batch = collate_sft(examples, tiny_tokenizer.pad_token_id)
    logp = response_logprobs(get_backbone(model), get_lm_head(model), batch)
    # reference: the model's own forward over all positions, log-softmax, gather the next token
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = []
    for b, ex in enumerate(examples):
        p, r = len(ex.prompt_ids), len(ex.response_ids)
        for t in range(p - 1, p + r - 1):  # position t predicts token t+1, a response token
            ref.append(torch.log_softmax(logits[b, t].float(), -1)[batch["input_ids"][b, t + 1]])
    assert logp.shape == (sum(len(e.response_ids) for e in examples),)
    torch.testing.assert_close(logp, torch.stack(ref), atol=1e-5, rtol=1e-5)
    # a batch with labels only (no precomputed positions) gives the same values
    labels_only = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    torch.testing.assert_close(response_logprobs(get_backbone(model), get_lm_head(model), labels_only), logp)


def test_no_full_vocab_logits_over_all_positions(make_tiny_lm, tiny_tokenizer):
    model = make_tiny_lm(seed=1)
    long_prompt = " ".join(["function argument"] * 30)
    rows = load_sft_rows([{"prompt": long_prompt, "response": " ok"}] * 4)
    batch = collate_sft(tokenize_sft_rows(rows, tiny_tokenizer), tiny_tokenizer.pad_token_id)
    B, T = batch["input_ids"].shape
    V = model.config.vocab_size
    with AllocationTracker() as tracker:
        response_logprobs(get_backbone(model), get_lm_head(model), batch).sum().backward()
    n_resp = int((batch["labels"] != -100).sum())
    assert n_resp * 10 < B * T
    # the LM head only ever sees the response positions: no vocab-wide tensor over more rows than that
    vocab_wide = [a for a in tracker.allocations if a.shape and a.shape[-1] == V and len(a.shape) >= 2]
    assert vocab_wide, "expected the LM head's logits (or their chunks) to be seen"
    assert max(math.prod(a.shape[:-1]) for a in vocab_wide) <= n_resp, [a.shape for a in vocab_wide]


def test_sft_lowers_heldout_loss(tmp_path, make_tiny_lm, tiny_tokenizer, corpus):
    from transformers import AutoModelForCausalLM

    train = sft_pairs(corpus.train[:300], response_words=20)
    held = sft_pairs(corpus.heldout[:16], windows_per_paragraph=1, response_words=20)
    cfg = quiet_config(tmp_path, max_steps=20, learning_rate=1e-2, warmup_steps=3, per_device_train_batch_size=8,
                       max_length=64, eval_steps=10)
    result = train_sft(cfg, model=make_tiny_lm(seed=0), tokenizer=tiny_tokenizer, train_dataset=train,
                       eval_dataset=held)
    m = result.metrics
    assert m["initial_eval_loss"] > math.log(384) - 0.5  # random init: about uniform over the vocabulary
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 0.8, m
    out = result.output_dir
    summary = require_finished_stage(out, stage="sft")
    assert summary["final_eval_loss"] == m["final_eval_loss"] and summary["steps"] == 20
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [5, 10, 15, 20]
    assert all(x["tokens_per_s"] > 0 and x["lr"] > 0 and math.isfinite(x["grad_norm"]) for x in train_lines)
    assert [x["step"] for x in lines if "eval_loss" in x] == [0, 10, 20]
    assert json.loads((out / "stage_config.json").read_text())["max_steps"] == 20
    # the saved directory is a plain HF model that computes what the trained one computes
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 17, 42, 99]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, make_tiny_lm, tiny_tokenizer):
    rows = [{"prompt": "The function", "response": " returns a value"},
            {"prompt": "A class", "response": " may define methods and data attributes"},
            {"prompt": "x", "response": " y"},
            {"prompt": "An error is raised when", "response": " the file name is wrong"}]
    # adam_epsilon=1 makes AdamW's first update ~ lr * g / (|g| + 1), linear in the gradient; with the
    # default eps it is lr * sign(g), which turns float rounding in near-zero gradients into ±lr.
    common = dict(max_steps=1, learning_rate=1e-2, max_grad_norm=0.0, lr_scheduler_type="constant",
                  eval_fraction=0.0, adam_epsilon=1.0)
    one = train_sft(quiet_config(tmp_path / "a", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common),
                    model=make_tiny_lm(seed=5), tokenizer=tiny_tokenizer, train_dataset=rows)
    acc = train_sft(quiet_config(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common),
                    model=make_tiny_lm(seed=5), tokenizer=tiny_tokenizer, train_dataset=rows)
    untouched = make_tiny_lm(seed=5)
    moved = 0
    for (name, a), b, c in zip(one.model.named_parameters(), acc.model.parameters(), untouched.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5, msg=name)
        moved += not torch.equal(a, c)
    assert moved > 10
    assert one.metrics["train_loss"] == pytest.approx(acc.metrics["train_loss"], rel=1e-5)


def test_nonfinite_loss_stops_and_keeps_the_previous_output(tmp_path, make_tiny_lm, tiny_tokenizer):
    out = tmp_path / "sft"
    save_stage(make_tiny_lm(seed=1, hidden_size=16), tiny_tokenizer, out, {"run": "previous"}, stage="sft")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    poisoned = make_tiny_lm(seed=2)
    with torch.no_grad():
        poisoned.model.norm.weight[0] = float("nan")
    cfg = quiet_config(tmp_path, output_dir=str(out), max_steps=10, max_nonfinite_steps=2, eval_fraction=0.0)
    rows = [{"prompt": "a", "response": " b c"}] * 8
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at 3 steps"):
        train_sft(cfg, model=poisoned, tokenizer=tiny_tokenizer, train_dataset=rows)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_bad_dataset_path_names_the_file(tmp_path, make_tiny_lm, tiny_tokenizer):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=rf"{bad} line 2: an SFT row needs columns 'prompt' and 'response'"):
        train_sft(quiet_config(tmp_path, dataset=str(bad), max_steps=1), model=make_tiny_lm(), tokenizer=tiny_tokenizer)
    assert not (tmp_path / "sft").exists()


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path, make_tiny_lm, tiny_tokenizer):
    rows = [{"prompt": "The function", "response": " returns a value"}] * 8
    cfg = quiet_config(tmp_path, max_steps=2, bf16=True, gradient_checkpointing=True, eval_fraction=0.25)
    result = train_sft(cfg, model=make_tiny_lm(), tokenizer=tiny_tokenizer, train_dataset=rows)
    assert math.isfinite(result.metrics["train_loss"]) and math.isfinite(result.metrics["final_eval_loss"])
    assert next(result.model.parameters()).dtype == torch.float32  # autocast only; weights stay fp32
    assert result.model.config.use_cache is True
    assert not any(getattr(m, "gradient_checkpointing", False) for m in result.model.modules())
