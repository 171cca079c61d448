"""DPO: rlhf_fast's DPOTrainer against TRL 1.12's DPOTrainer on the same model and preference data.

    python -m benchmarks.bench_dpo [--full | --smoke] [--shape 0.5b toy] [--device cuda] [--steps N] [--vocab 32000]

Models (docs/design.md "Benchmarks"): the 0.5B-width Qwen2 (hidden 896, intermediate 4864, 12 layers, 14 heads,
2 KV heads; the headline) and the toy one (hidden 128, intermediate 256, 2 layers, 4 heads, 2 KV heads;
labelled toy), untied embeddings, vocab 32000 by default, random init, fp32. Data: synthetic preference rows over a word-level
tokenizer (one word = one token), so both libraries see exactly the same token ids: prompts of 4-12
tokens, chosen and rejected responses of 64 tokens each (63 random tokens + EOS). Batch 8 pairs per
step (16 sequences), AdamW, lr 5e-5 linear, grad clip 1.0, beta 0.1, loss "sigmoid", one log line per step.

Sides, each in its own process (memory = peak RSS above the post-import baseline; both sides import
torch, transformers, trl and rlhf_fast.stages.dpo at module top, so the baseline carries the same libraries):
  trl-precompute  TRL DPOTrainer, precompute_ref_log_probs=True (no reference model kept: our setting)
  trl             TRL DPOTrainer as its docs run it: a reference model (a copy of the policy) in memory
  rlhf_fast       our DPOTrainer (reference log-probs cached once before training, fused log-prob op)
Time = median seconds per optimizer step after the first (wall clock between on_step_end callbacks;
reference precomputation, data preparation and saving happen outside that window on every side).
With --repeats N the sides run round-robin N times and each keeps its fastest run. The note column
carries the median process CPU time per step (less sensitive to a shared machine's load than wall time).
Steps per side: toy 8 (--full 20); 0.5B width 2 (--full 6): the first is not timed; memory from a second,
shorter run (1 step; --full 2) with MALLOC_MMAP_THRESHOLD_. --smoke: a tiny model, 2 steps (checks that every
side runs; numbers mean nothing, nothing is appended to the CSV). Durations on an idle 2-core CPU (estimated):
quick 0.5B 3.5 minutes + toy 1.5; --full 0.5B 7 minutes + toy 2.5.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import tempfile

from benchmarks.common import (
    SHAPE_LABELS,
    append_rows,
    bench_model_dir,
    clock,
    make_row,
    print_table,
    ratio,
    run_side,
    step_stats,
    write_models,
)

try:  # imported before the memory baseline, so both sides carry the same libraries
    import torch
    import transformers  # noqa: F401

    import rlhf_fast.stages.dpo  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:
    import trl
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    TRL_ERROR = None
except Exception as exc:  # noqa: BLE001 - trl missing or incompatible: the side reports it
    trl = TRLDPOConfig = TRLDPOTrainer = None
    TRL_ERROR = f"trl DPOTrainer unavailable ({exc!r}); pip install 'rlhf_fast[bench]' (trl==1.12.0)"

BATCH, RESPONSE, BETA, LR = 8, 64, 0.1, 5e-5
PROVIDERS = ("trl-precompute", "trl", "rlhf_fast")


def _model_dir(shape: str, vocab: int) -> str:
    """The policy (Qwen2 of ``shape``, random init) and its word-level tokenizer, written once; its directory."""
    return os.path.join(write_models(bench_model_dir(f"dpo_{shape}_v{vocab}"), shape, vocab, reward=False), "sft")


def preference_rows(vocab: int, n: int, seed: int = 1234) -> list[dict]:
    """n rows {"prompt", "chosen", "rejected"}: 4-12 prompt tokens, 64-token responses ending in <eos>.

    Each response already ends with the EOS word, so neither library appends another one."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(k))  # noqa: E731
    return [{"prompt": words(rng.randint(4, 12)), "chosen": " " + words(RESPONSE - 1) + " <eos>",
             "rejected": " " + words(RESPONSE - 1) + " <eos>"} for _ in range(n)]


def side(provider: str, vocab: int, steps: int, model_dir: str, device: str = "cpu") -> dict:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    rows = preference_rows(vocab, BATCH * steps)
    # Not AutoTokenizer: transformers 5 picks Qwen2Tokenizer from config.json's model_type and ignores
    # tokenizer.json's word-level model (every row would collapse to a few byte tokens).
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    out = tempfile.mkdtemp(prefix=f"bench_dpo_{provider}_")
    try:
        return _train(provider, policy, tok, rows, steps, model_dir, out, device)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _train(provider, policy, tok, rows, steps, model_dir, out, device) -> dict:
    stamps = [clock()]  # the first interval (trainer set-up, reference log-probs, step 1) is not timed
    if provider == "rlhf_fast":
        from rlhf_fast.stages.dpo import DPOConfig, DPOTrainer

        cfg = DPOConfig(model_name_or_path=model_dir, output_dir=os.path.join(out, "dpo"), device=device,
                        beta=BETA, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
                        learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=1.0, max_steps=steps,
                        logging_steps=1, eval_fraction=0.0, max_length=1024, disable_tqdm=True, seed=0)
        trainer = DPOTrainer(cfg, policy, tok, train_dataset=rows)
        result = trainer.train(on_step_end=lambda step: stamps.append(clock()))
        stats = step_stats(stamps)
        stats["train_loss"] = result.metrics["train_loss"]
        return stats
    if TRLDPOTrainer is None:
        return {"error": TRL_ERROR}
    from datasets import Dataset
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(clock())

    args = TRLDPOConfig(output_dir=out, use_cpu=device == "cpu", bf16=False, per_device_train_batch_size=BATCH,
                        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=1.0,
                        max_steps=steps, logging_steps=1, beta=BETA, loss_type=["sigmoid"], report_to="none",
                        save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=0, max_length=1024,
                        precompute_ref_log_probs=provider == "trl-precompute", dataloader_num_workers=0)
    ref = None if provider == "trl-precompute" else copy.deepcopy(policy)
    trainer = TRLDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tok, callbacks=[Clock()])
    trainer.train()
    stats = step_stats(stamps)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    stats["train_loss"] = losses[-1] if losses else None
    return stats


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="more steps")
    mode.add_argument("--smoke", action="store_true", help="a tiny model, 2 steps: check that every side runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", nargs="*", default=["0.5b", "toy"], choices=["0.5b", "toy"])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per side (the first is not timed)")
    ap.add_argument("--vocab", type=int, nargs="*", default=[32000])
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the sides round-robin this many times and keep each side's fastest run (a shared, "
                         "noisy machine: the load then hits every side alike)")
    args = ap.parse_args(argv)
    cases = [("smoke", 512)] if args.smoke else [(shape, vocab) for shape in args.shape for vocab in args.vocab]
    rows, summary = [], []
    for shape, vocab in cases:
        toy = shape in ("toy", "smoke")
        steps = args.steps or (2 if args.smoke else (20 if args.full else 8) if toy else (6 if args.full else 2))
        mem_steps = None if toy else (2 if args.full else 1)
        model_dir = _model_dir(shape, vocab)
        res: dict[str, dict] = {}
        for _ in range(max(1, args.repeats)):
            for p in args.providers:
                r = run_side("benchmarks.bench_dpo:side", steps, mem_steps, args.device, provider=p, vocab=vocab,
                             model_dir=model_dir, timeout=4 * 3600)
                if p not in res or r.get("time_ms", float("inf")) < res[p].get("time_ms", float("inf")):
                    res[p] = r
        label = f"{SHAPE_LABELS[shape]} B={BATCH} pairs, resp={RESPONSE}, V={vocab}"
        for p, r in res.items():
            pairs_per_s = BATCH / (r["time_ms"] * 1e-3) if "time_ms" in r else None
            note = f"cpu_ms={r['cpu_ms']:.0f}; {r['timed_steps']} timed steps" if "cpu_ms" in r else ""
            rows.append(make_row("dpo", "dpo_step", label, "float32", p, r, args.device, pairs_per_s, "pairs/s", note))
        ours = res.get("rlhf_fast", {})
        for base in [p for p in res if p != "rlhf_fast"]:
            b = res[base]
            line = (f"[{SHAPE_LABELS[shape]} V={vocab}] vs {base}: time ours/{base} = "
                    f"{ratio(ours.get('time_ms'), b.get('time_ms'))} (speed-up {ratio(b.get('time_ms'), ours.get('time_ms'))}x; "
                    f"CPU time {ratio(b.get('cpu_ms'), ours.get('cpu_ms'))}x), memory ours/{base} = "
                    f"{ratio(ours.get('mem_bytes'), b.get('mem_bytes'))}")
            if "error" in b:
                line += f"  [{base} skipped: {b['error']}]"
            summary.append(line)
    print_table(rows)
    for line in summary:
        print(line)
    if not args.smoke:
        append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
