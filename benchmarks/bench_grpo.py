"""GRPO end to end: rlhf_fast's PPOTrainer(advantage_estimator="grpo") against TRL's current GRPOTrainer.

    python -m benchmarks.bench_grpo [--full] [--device cpu] [--steps N] [--vocab 32000 1000]
                                    [--beta 0.04] [--trl-python PATH | --trl-installed]

Model: docs/design.md's toy Qwen2 (hidden 128, intermediate 256, 2 layers, 4 heads, 2 KV heads, untied
embeddings), random init, fp32. Per step: 8 prompts of 4-12 words (a word-level tokenizer, one word = one
token, so both libraries see the same ids) x 4 generations = 32 completions of up to 64 tokens (stop at
EOS), temperature 1.0, one generation and one optimizer update per step (TRL: steps_per_generation = 1,
num_iterations = 1; ours: num_ppo_epochs = 1, num_mini_batches = 1), beta = 0.04 (a frozen fp32 reference
on both sides; --beta 0 drops it on both), token-level loss normalisation (TRL loss_type "dapo", ours
loss_agg_mode "token-mean"), AdamW lr 1e-5, no gradient checkpointing, no vLLM. Reward: the same Python
callable on both sides (share of completion words equal to "t5").

"TRL's current GRPOTrainer": the TRL side runs under a separate interpreter, by default a venv this
script creates on first use in benchmarks/.venv-trl-current/ (ignored by git through its own .gitignore)
with trl==1.16.0 (newest on PyPI at the time of writing). That venv sees this venv's packages through a
.pth file, and `pip install torch==<ours> trl==1.16.0 transformers==<ours>` runs as ONE command, so the
pins are satisfied by the torch (CPU) and transformers already installed and only TRL is added: no CUDA
torch is ever pulled (plus `requests`, which trl 1.16's GRPO module imports without declaring). --trl-python PATH uses another interpreter; if the venv cannot be built the
installed trl (1.12.0, the [bench] pin) is used and a note is printed. The provider column records the
TRL version ("trl==1.16.0").

Sides, each in its own process (memory = peak RSS above the post-import baseline, MALLOC_MMAP_THRESHOLD_
set; both sides import torch, transformers, trl and rlhf_fast.trainer at module top):
  trl==X         trl.GRPOTrainer
  rlhf_fast      our PPOTrainer with advantage_estimator="grpo" (no critic; on-policy update, so the old
                 log-probs come from the update's own forward, as TRL does)
Time = median seconds per step after the first: perf_counter at on_step_begin and on_step_end of a
TrainerCallback on both sides (generation, scoring, reference forward and the update are inside); the note
column carries the median process CPU time per step (less sensitive to a shared machine's load). With
--repeats N the sides run round-robin N times and each keeps its fastest run.
Not in run_all's quick suite (a quick run takes minutes here): run it directly or with --full.
Target (issue 10): ours >= 2x faster and <= 0.6x the memory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    import trl
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    TRL_ERROR = None
except Exception as exc:  # noqa: BLE001 - trl missing or incompatible: the side reports it
    trl = TRLGRPOConfig = TRLGRPOTrainer = None
    TRL_ERROR = f"trl GRPOTrainer unavailable ({exc!r})"

PROMPTS, GENERATIONS, RESPONSE, LR, TEMPERATURE = 8, 4, 64, 1e-5, 1.0
TRL_CURRENT = "1.16.0"
ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = Path(__file__).resolve().parent / ".venv-trl-current"


# ----------------------------------------------------------------------------- the shared pieces
def share_of_t5(prompts=None, completions=None, **kwargs) -> list[float]:
    """The reward both sides call: share of completion words equal to "t5" (TRL passes extra kwargs)."""
    out = []
    for c in completions:
        words = c.split() if isinstance(c, str) else str(c).split()
        out.append(sum(w == "t5" for w in words) / max(len(words), 1))
    return out


def _models(model_dir: str, vocab: int) -> str:
    """Write the tiny policy and the word-level tokenizer once; return the directory."""
    from transformers import Qwen2ForCausalLM

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        torch.manual_seed(0)
        Qwen2ForCausalLM(tiny_qwen2_config(vocab)).save_pretrained(model_dir)
        word_tokenizer(vocab).save_pretrained(model_dir)
    return model_dir


def _prompts(vocab: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1234)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 13, (1,), generator=g))
        rows.append({"prompt": " ".join(f"t{int(i)}" for i in torch.randint(3, vocab, (length,), generator=g))})
    return rows


class _Clock:
    """perf_counter at on_step_begin / on_step_end (a TrainerCallback built lazily)."""

    def __init__(self):
        from transformers import TrainerCallback

        self.begin, self.end, self.cpu_begin, self.cpu_end = [], [], [], []
        outer = self

        class Cb(TrainerCallback):
            def on_step_begin(self, *a, **k):
                outer.begin.append(time.perf_counter())
                outer.cpu_begin.append(time.process_time())

            def on_step_end(self, *a, **k):
                outer.end.append(time.perf_counter())
                outer.cpu_end.append(time.process_time())

        self.callback = Cb()

    def result(self) -> dict:
        steps = [e - b for b, e in zip(self.begin, self.end)]
        after_first = steps[1:] or steps
        t = statistics.median(after_first)
        cpu = [e - b for b, e in zip(self.cpu_begin, self.cpu_end)]
        cpu_s = statistics.median(cpu[1:] or cpu)
        return {"time_ms": t * 1e3, "time_p20_ms": min(after_first) * 1e3, "time_p80_ms": max(after_first) * 1e3,
                "steps": len(steps), "first_step_s": steps[0], "cpu_ms": cpu_s * 1e3}


def side(provider: str, vocab: int, steps: int, model_dir: str, beta: float, device: str = "cpu") -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix=f"bench_grpo_{provider.split('=')[0]}_")
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir, padding_side="left")
    data = Dataset.from_list(_prompts(vocab, PROMPTS * (steps + 1)))
    completions = PROMPTS * GENERATIONS
    common = dict(output_dir=out, use_cpu=device == "cpu", bf16=False, fp16=False, per_device_train_batch_size=completions,
                  gradient_accumulation_steps=1, learning_rate=LR, temperature=TEMPERATURE, report_to="none",
                  save_strategy="no", logging_steps=1, gradient_checkpointing=False, disable_tqdm=True, seed=0,
                  max_steps=steps, num_train_epochs=1, dataloader_num_workers=0)
    clock = _Clock()
    if provider.startswith("trl"):
        if TRLGRPOTrainer is None:
            return {"error": TRL_ERROR}
        args = TRLGRPOConfig(**common, num_generations=GENERATIONS, max_completion_length=RESPONSE, beta=beta,
                             num_iterations=1, steps_per_generation=1, loss_type="dapo", scale_rewards="group",
                             use_vllm=False, log_completions=False, disable_dropout=True)
        trainer = TRLGRPOTrainer(model=model_dir, reward_funcs=share_of_t5, args=args, train_dataset=data,
                                 processing_class=tok, callbacks=[clock.callback])
        trainer.train()
        res = clock.result()
        res["trl_version"] = trl.__version__
        gen = trainer.model.generation_config if hasattr(trainer, "model") else None
        res["check"] = {"ref_model": getattr(trainer, "ref_model", None) is not None,
                        "steps_per_generation": args.steps_per_generation,
                        "generation_batch_size": args.generation_batch_size,
                        "eos_token_id": getattr(gen, "eos_token_id", None)}
        return res
    from rlhf_fast.trainer import PPOConfig, PPOTrainer

    args = PPOConfig(**common, advantage_estimator="grpo", num_generations=GENERATIONS, kl_coef=beta,
                     response_length=RESPONSE, stop_token="eos", num_ppo_epochs=1, num_mini_batches=1,
                     loss_agg_mode="token-mean", cliprange=0.2, num_sample_generations=0,
                     total_episodes=completions * steps, local_rollout_forward_batch_size=completions)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = PPOTrainer(args, tok, policy, None, share_of_t5, data, callbacks=[clock.callback])
    trainer.train()
    res = clock.result()
    res["check"] = {"reference": trainer.reference_mode, "critic": trainer.critic_mode}
    return res


# ----------------------------------------------------------------------------- the TRL interpreter
def _trl_version(python: str) -> str | None:
    try:
        out = subprocess.run([python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True,
                             timeout=120, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ensure_trl_venv(version: str = TRL_CURRENT) -> str | None:
    """Path of an interpreter with trl==version next to our torch/transformers, building the venv once.

    Returns None (and prints why) when it cannot be built; the caller falls back to the installed trl."""
    python = TRL_VENV / "bin" / "python"
    if python.exists() and _trl_version(str(python)) == version:
        return str(python)
    try:
        import site

        import transformers as tf

        print(f"[bench_grpo] building {TRL_VENV} (trl=={version}, first use only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True, timeout=600)
        (TRL_VENV / ".gitignore").write_text("*\n")
        new_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                  check=True, capture_output=True, text=True).stdout.strip()
        # This venv's packages (CPU torch, transformers, ...) become visible to the new one.
        Path(new_site, "_rlhf_fast_main_venv.pth").write_text(site.getsitepackages()[0] + "\n")
        torch_version = torch.__version__.split("+")[0]
        seen = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                              text=True, timeout=300, cwd=tempfile.gettempdir()).stdout.strip()
        if seen.split("+")[0] != torch_version:  # never let pip resolve torch itself (a CUDA wheel)
            raise RuntimeError(f"the new venv does not see this venv's torch (got {seen!r})")
        # requests: trl 1.16's grpo_trainer imports it (its vLLM client) without declaring it.
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}", f"trl=={version}",
                        f"transformers=={tf.__version__}", "requests"], check=True, timeout=1800)
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to the installed trl
        print(f"[bench_grpo] could not build {TRL_VENV}: {exc}", flush=True)
        return None
    return str(python) if _trl_version(str(python)) == version else None


# ----------------------------------------------------------------------------- main
def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="more steps, both vocabularies")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="steps per side (the first is not timed)")
    ap.add_argument("--vocab", type=int, nargs="*", default=None, help="default: 32000 (quick), 32000 1000 (--full)")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--repeats", type=int, default=1, help="run the sides round-robin N times, keep each one's fastest")
    ap.add_argument("--trl-python", default=None, help=f"interpreter with the TRL to compare with (default: "
                                                       f"{TRL_VENV.name}/ with trl=={TRL_CURRENT})")
    ap.add_argument("--trl-installed", action="store_true", help="use this interpreter's installed trl")
    args = ap.parse_args(argv)
    steps = args.steps or (8 if args.full else 4)
    vocabs = args.vocab or ([32000, 1000] if args.full else [32000])
    if args.trl_installed:
        trl_python = sys.executable
    elif args.trl_python:
        trl_python = args.trl_python
    else:
        trl_python = ensure_trl_venv() or sys.executable
    trl_ver = _trl_version(trl_python) or "missing"
    if trl_python == sys.executable and not args.trl_installed:
        print(f"[bench_grpo] note: comparing with the installed trl=={trl_ver}, not trl=={TRL_CURRENT}")
    trl_name = f"trl=={trl_ver}"
    rows, summary = [], []
    for vocab in vocabs:
        model_dir = _models(os.path.join(tempfile.gettempdir(), f"rlhf_fast_bench_grpo_v{vocab}"), vocab)
        kw = dict(vocab=vocab, steps=steps, model_dir=model_dir, beta=args.beta, device=args.device)
        res: dict[str, dict] = {}
        for _ in range(max(1, args.repeats)):  # round-robin; each side keeps its fastest run
            for p in (trl_name, "rlhf_fast"):
                r = run_timed_and_measured("benchmarks.bench_grpo:side", timeout=3600,
                                           python=trl_python if p == trl_name else None, provider=p, **kw)
                if p not in res or r.get("time_ms", float("inf")) < res[p].get("time_ms", float("inf")):
                    res[p] = r
        shape = f"P{PROMPTS}x{GENERATIONS} R{RESPONSE} V{vocab} beta{args.beta:g}"
        for p, r in res.items():
            t = r.get("time_ms")
            note = f"cpu {r['cpu_ms'] / 1e3:.2f} s/step" if r.get("cpu_ms") else ""
            rows.append(make_row("grpo", "grpo_step", shape, "float32", p, r, args.device,
                                 PROMPTS * GENERATIONS * RESPONSE / (t / 1e3) if t else None, "tok/s", note))
            if r.get("check"):
                print(f"[bench_grpo] {p} V={vocab}: {r['check']}")
        speed = ratio(res[trl_name].get("time_ms"), res["rlhf_fast"].get("time_ms"))
        mem = ratio(res["rlhf_fast"].get("mem_bytes"), res[trl_name].get("mem_bytes"))
        cpu = ratio(res[trl_name].get("cpu_ms"), res["rlhf_fast"].get("cpu_ms"))
        summary.append(f"V={vocab}: rlhf_fast is {speed}x faster per step than {trl_name} (target >= 2; process CPU "
                       f"time {cpu}x less); memory {mem}x of its (target <= 0.6)")
    print_table(rows, cols=("op", "shape", "provider", "time_ms", "mem_bytes", "achieved", "note"))
    for line in summary:
        print(line)
    append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
