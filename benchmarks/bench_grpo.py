"""GRPO end to end: rlhf_fast's GRPOTrainer (the drop-in) against TRL's current GRPOTrainer, on the same script.

    python -m benchmarks.bench_grpo [--shape 0.5b toy] [--device cpu] [--steps N] [--vocab 32000]
                                    [--prompts 8] [--generations 4] [--response 64] [--fp32] [--with-ppo]
                                    [--repeats N] [--trl-python PATH | --trl-installed]

The same ``side`` function runs both: it imports ``GRPOConfig, GRPOTrainer`` from ``trl`` or from ``rlhf_fast``
(the only difference, as for a migrated script) and builds both with the same arguments: TRL's defaults
(GRPOConfig: beta 0 so no reference model, loss_type "dapo", scale_rewards "group", num_iterations 1,
steps_per_generation = gradient_accumulation_steps = 1, temperature 1, learning rate 1e-6, bf16 autocast, TRL's
gradient checkpointing on / ours decided from memory) except the batch (--prompts x --generations completions
per step: per_device_train_batch_size and num_generations), the generation length (max_completion_length), the
run length (max_steps) and the reporting (report_to none, logging every step, no saving, no progress bar).
--fp32 turns bf16 off on both sides. --with-ppo adds rlhf_fast's PPOTrainer(advantage_estimator="grpo") row.

Shapes (docs/design.md, Qwen2, untied embeddings, random init): "0.5b" = the 0.5B width (hidden 896,
intermediate 4864, 12 layers, 14 heads, 2 KV heads) and "toy" (hidden 128, intermediate 256, 2 layers, 4 heads,
2 KV heads), vocab --vocab (32000). Prompts of 4-12 words (a word-level tokenizer, one word = one token, so
both libraries see the same ids); completions stop at EOS or --response tokens. Reward: the same Python
callable on both sides (share of completion words equal to "t5").

"TRL's current GRPOTrainer": the TRL side runs under a separate interpreter, by default a venv this
script creates on first use in benchmarks/.venv-trl-current/ (ignored by git through its own .gitignore)
with trl==1.16.0 (newest on PyPI at the time of writing). That venv sees this venv's packages through a
.pth file, and `pip install torch==<ours> trl==1.16.0 transformers==<ours>` runs as ONE command, so the
pins are satisfied by the torch (CPU) and transformers already installed and only TRL is added: no CUDA
torch is ever pulled (plus `requests`, which trl 1.16's GRPO module imports without declaring). A cold build
takes about 20 s. --trl-python PATH uses another interpreter; if the venv cannot be built the installed trl
(1.12.0, the [bench] pin) is used and a note is printed. The provider column records the TRL version.

Each side runs in its own process (memory = peak RSS above the post-import baseline, MALLOC_MMAP_THRESHOLD_
set; both sides import torch, transformers, trl and rlhf_fast.trainer at module top). Time = median seconds
per optimizer step after the first: perf_counter at on_step_begin and on_step_end of a TrainerCallback
(generation, scoring and the update are inside); the note column carries the median process CPU time per
step. With --repeats N the sides run round-robin N times and each keeps its fastest run.
Not in run_all's quick suite (minutes on a small CPU): run it directly or with --full.
Target (issue 17, 0.5B width): ours >= 1.5x faster per step at <= 0.8x the memory above baseline.
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
    qwen2_config,
    ratio,
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

TRL_CURRENT = "1.16.0"
ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = Path(__file__).resolve().parent / ".venv-trl-current"
SHAPES = ("0.5b", "toy")  # benchmarks.common.SHAPES


# ----------------------------------------------------------------------------- the shared pieces
def share_of_t5(prompts=None, completions=None, **kwargs) -> list[float]:
    """The reward both sides call: share of completion words equal to "t5" (TRL passes extra kwargs)."""
    out = []
    for c in completions:
        words = c.split() if isinstance(c, str) else str(c).split()
        out.append(sum(w == "t5" for w in words) / max(len(words), 1))
    return out


def model_config(shape: str, vocab: int):
    # Built from the shape (not by editing the toy config: transformers sizes per-layer lists such as
    # layer_types from num_hidden_layers at construction).
    return qwen2_config(shape, vocab)


def _models(model_dir: str, shape: str, vocab: int) -> str:
    """Write the random-init policy and the word-level tokenizer once; return the directory."""
    from transformers import Qwen2ForCausalLM

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        torch.manual_seed(0)
        Qwen2ForCausalLM(model_config(shape, vocab)).save_pretrained(model_dir)
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


def side(provider: str, shape: str, vocab: int, steps: int, model_dir: str, prompts: int, generations: int,
         response: int, fp32: bool = False, device: str = "cpu") -> dict:
    """One side: ``from trl`` or ``from rlhf_fast`` ``import GRPOConfig, GRPOTrainer``, the same arguments."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix=f"bench_grpo_{provider.split('=')[0]}_")
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir, padding_side="left")
    data = Dataset.from_list(_prompts(vocab, prompts * (steps + 1)))
    clock = _Clock()
    common = dict(output_dir=out, per_device_train_batch_size=prompts * generations, num_generations=generations,
                  max_completion_length=response, max_steps=steps, report_to="none", logging_steps=1,
                  save_strategy="no", disable_tqdm=True, use_cpu=device == "cpu", **({"bf16": False} if fp32 else {}))
    if provider == "rlhf_fast-ppo":  # the PPOTrainer route of docs/migrating_from_trl.md, for comparison
        return _ppo_side(common, tok, data, model_dir, clock, generations, response, steps, fp32)
    if provider.startswith("trl"):
        if TRLGRPOTrainer is None:
            return {"error": TRL_ERROR}
        GRPOConfig, GRPOTrainer = TRLGRPOConfig, TRLGRPOTrainer
    else:
        from rlhf_fast import GRPOConfig, GRPOTrainer
    args = GRPOConfig(**common)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=share_of_t5, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[clock.callback])
    trainer.train()
    res = clock.result()
    res["check"] = {"gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
                    "generation_batch_size": args.generation_batch_size, "beta": args.beta,
                    "loss_type": args.loss_type}
    if provider.startswith("trl"):
        res["trl_version"] = trl.__version__
    return res


def _ppo_side(common, tok, data, model_dir, clock, generations, response, steps, fp32) -> dict:
    from transformers import AutoModelForCausalLM

    from rlhf_fast.trainer import PPOConfig, PPOTrainer

    kw = {k: v for k, v in common.items() if k not in ("num_generations", "max_completion_length")}
    args = PPOConfig(**kw, advantage_estimator="grpo", num_generations=generations, kl_coef=0.0,
                     response_length=response, stop_token="eos", num_ppo_epochs=1, num_mini_batches=1,
                     learning_rate=1e-6, temperature=1.0, num_sample_generations=0,
                     total_episodes=common["per_device_train_batch_size"] * steps,
                     local_rollout_forward_batch_size=common["per_device_train_batch_size"])
    trainer = PPOTrainer(args, tok, AutoModelForCausalLM.from_pretrained(model_dir), None, share_of_t5, data,
                         callbacks=[clock.callback])
    trainer.train()
    return clock.result()


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
    ap.add_argument("--full", action="store_true", help="more steps, both shapes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", nargs="*", default=None, choices=sorted(SHAPES), help="default: 0.5b (quick), both (--full)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per side (the first is not timed)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--fp32", action="store_true", help="bf16 off on both sides (TRL's default is bf16 autocast)")
    ap.add_argument("--with-ppo", action="store_true", help="also time PPOTrainer(advantage_estimator='grpo')")
    ap.add_argument("--repeats", type=int, default=1, help="run the sides round-robin N times, keep each one's fastest")
    ap.add_argument("--trl-python", default=None, help=f"interpreter with the TRL to compare with (default: "
                                                       f"{TRL_VENV.name}/ with trl=={TRL_CURRENT})")
    ap.add_argument("--trl-installed", action="store_true", help="use this interpreter's installed trl")
    args = ap.parse_args(argv)
    steps = args.steps or (8 if args.full else 4)
    shapes = args.shape or (["0.5b", "toy"] if args.full else ["0.5b"])
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
    providers = [trl_name, "rlhf_fast"] + (["rlhf_fast-ppo"] if args.with_ppo else [])
    dtype = "float32" if args.fp32 else "bf16-autocast"
    rows, summary = [], []
    for shape in shapes:
        model_dir = _models(os.path.join(tempfile.gettempdir(), f"rlhf_fast_bench_grpo_{shape}_v{args.vocab}"), shape,
                            args.vocab)
        kw = dict(shape=shape, vocab=args.vocab, steps=steps, model_dir=model_dir, prompts=args.prompts,
                  generations=args.generations, response=args.response, fp32=args.fp32, device=args.device)
        res: dict[str, dict] = {}
        for _ in range(max(1, args.repeats)):  # round-robin; each side keeps its fastest run
            for p in providers:
                r = run_timed_and_measured("benchmarks.bench_grpo:side", timeout=7200,
                                           python=trl_python if p == trl_name else None, provider=p, **kw)
                if p not in res or r.get("time_ms", float("inf")) < res[p].get("time_ms", float("inf")):
                    res[p] = r
        label = f"{shape} P{args.prompts}x{args.generations} R{args.response} V{args.vocab}"
        for p, r in res.items():
            t = r.get("time_ms")
            note = f"cpu {r['cpu_ms'] / 1e3:.2f} s/step" if r.get("cpu_ms") else ""
            rows.append(make_row("grpo", "grpo_step", label, dtype, p, r, args.device,
                                 args.prompts * args.generations * args.response / (t / 1e3) if t else None, "tok/s",
                                 note))
            if r.get("check"):
                print(f"[bench_grpo] {p} {shape}: {r['check']}")
        speed = ratio(res[trl_name].get("time_ms"), res["rlhf_fast"].get("time_ms"))
        mem = ratio(res["rlhf_fast"].get("mem_bytes"), res[trl_name].get("mem_bytes"))
        cpu = ratio(res[trl_name].get("cpu_ms"), res["rlhf_fast"].get("cpu_ms"))
        summary.append(f"{shape}: rlhf_fast GRPOTrainer is {speed}x faster per step than {trl_name} (process CPU time "
                       f"{cpu}x less); memory {mem}x of its (issue 17 target at 0.5b: >= 1.5 and <= 0.8)")
    print_table(rows, cols=("op", "shape", "dtype", "provider", "time_ms", "mem_bytes", "achieved", "note"))
    for line in summary:
        print(line)
    append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
