"""PPO end to end: rlhf_fast's PPOTrainer against TRL 1.12's, same config, models and prompts.

    python -m benchmarks.bench_ppo_e2e [--full] [--device cuda] [--steps N] [--vocab 32000 1000]

Model: docs/design.md's toy Qwen2 (hidden 128, intermediate 256, 2 layers, 4 heads, 2 KV heads, untied
embeddings), batch 8, prompts of 4-12 tokens, responses of 64 tokens, 2 PPO epochs. Sides, each in
its own process (memory = peak RSS above the post-import baseline, or CUDA max allocated):
  trl              trl==1.12.0 PPOTrainer (policy, ref, value and reward models as its script passes)
  rlhf_fast-trl    our PPOTrainer with the same four models (separate critic, the given fp32 reference)
  rlhf_fast-shared our PPOTrainer with critic="shared" and a bf16 frozen reference (no value model built)
Time = median seconds per PPO step after the first (wall clock between on_step_end callbacks), from a
run with the default allocator; memory from a second run of the same side with MALLOC_MMAP_THRESHOLD_.
Tokens/s = batch x response_length / step time (nominal: both sides sample up to 64 tokens or EOS).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks.common import (
    append_rows,
    make_row,
    print_table,
    ratio,
    tiny_qwen2_config,
    word_tokenizer,
)
from rlhf_fast.measure import run_timed_and_measured

try:  # imported before the memory baseline, so both sides carry the same libraries
    import torch
    import transformers  # noqa: F401

    import rlhf_fast.trainer  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:
    import trl.experimental.ppo as trl_ppo
except Exception:  # noqa: BLE001 - trl missing or incompatible: the side reports it
    trl_ppo = None

BATCH, RESPONSE, EPOCHS = 8, 64, 2


def _models(model_dir: str, vocab: int):
    """Write the tiny policy / reward model and a word-level tokenizer once; return their paths."""
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    sft, rm = os.path.join(model_dir, "sft"), os.path.join(model_dir, "rm")
    if os.path.isdir(sft) and os.path.isdir(rm):
        return sft, rm
    tok, cfg = word_tokenizer(vocab), tiny_qwen2_config(vocab)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(sft)
    tok.save_pretrained(sft)
    cfg.num_labels = 1
    Qwen2ForSequenceClassification(cfg).save_pretrained(rm)
    return sft, rm


def _prompts(vocab: int, n: int):
    g = torch.Generator().manual_seed(1234)
    return [{"input_ids": torch.randint(3, vocab, (int(torch.randint(4, 13, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(n)]


def side(provider: str, vocab: int, steps: int, model_dir: str, device: str = "cpu") -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )

    if provider == "trl":
        if trl_ppo is None:
            return {"error": "trl==1.12.0 is not installed (pip install 'rlhf_fast[bench]')"}
        PPOConfig, PPOTrainer = trl_ppo.PPOConfig, trl_ppo.PPOTrainer
    else:
        from rlhf_fast.trainer import PPOConfig, PPOTrainer
    sft, rm = model_dir + "/sft", model_dir + "/rm"
    out = tempfile.mkdtemp(prefix=f"bench_ppo_{provider}_")
    kwargs = dict(output_dir=out, use_cpu=device == "cpu", bf16=False, per_device_train_batch_size=BATCH,
                  gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=EPOCHS,
                  total_episodes=BATCH * steps, response_length=RESPONSE, stop_token="eos", temperature=0.7,
                  report_to="none", save_strategy="no", num_sample_generations=0, logging_steps=1,
                  gradient_checkpointing=False, disable_tqdm=True, seed=0)
    if provider == "rlhf_fast-shared":
        kwargs.update(critic="shared", reference_dtype="bf16")
    args = PPOConfig(**kwargs)
    tok = PreTrainedTokenizerFast.from_pretrained(sft, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(sft)
    reward = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    if provider == "rlhf_fast-shared":
        ref, value = None, None
    else:
        ref = AutoModelForCausalLM.from_pretrained(sft)
        value = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    stamps = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_list(_prompts(vocab, 64)),
                         callbacks=[Clock()])
    trainer.train()
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    after_first = step_s[1:] or step_s
    t = statistics.median(after_first)
    return {"time_ms": t * 1e3, "time_p20_ms": min(after_first) * 1e3, "time_p80_ms": max(after_first) * 1e3,
            "steps": len(step_s), "first_step_s": step_s[0], "tokens_per_s": BATCH * RESPONSE / t}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="more steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="PPO steps per side (the first is not timed)")
    ap.add_argument("--vocab", type=int, nargs="*", default=[32000, 1000])
    ap.add_argument("--providers", nargs="*", default=["trl", "rlhf_fast-trl", "rlhf_fast-shared"])
    args = ap.parse_args(argv)
    steps = args.steps or (8 if args.full else 3)
    rows, summary = [], []
    for vocab in args.vocab:
        model_dir = os.path.join(tempfile.gettempdir(), f"rlhf_fast_bench_ppo_v{vocab}")
        _models(model_dir, vocab)
        res = {p: run_timed_and_measured("benchmarks.bench_ppo_e2e:side", provider=p, vocab=vocab, steps=steps,
                                         model_dir=model_dir, device=args.device, timeout=3600)
               for p in args.providers}
        shape = f"B{BATCH} R{RESPONSE} V{vocab} ep{EPOCHS}"
        for p, r in res.items():
            rows.append(make_row("ppo_e2e", "ppo_step", shape, "float32", p, r, args.device,
                                 r.get("tokens_per_s"), "tok/s"))
        base = res.get("trl", {})
        for p in args.providers:
            if p == "trl":
                continue
            speed = ratio(base.get("time_ms"), res[p].get("time_ms"))
            mem = ratio(res[p].get("mem_bytes"), base.get("mem_bytes"))
            summary.append(f"V={vocab}: {p} is {speed}x faster per step than trl; memory {mem}x of trl's")
    print_table(rows, cols=("op", "shape", "provider", "time_ms", "mem_bytes", "achieved", "note"))
    for line in summary:
        print(line)
    append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
