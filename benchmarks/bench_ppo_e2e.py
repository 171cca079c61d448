"""PPO end to end: examples/trl_ppo_script.py under trl==1.12.0 and, migrated by its import line, under rlhf_fast.

    python -m benchmarks.bench_ppo_e2e [--full | --smoke] [--workload 0.5b varlen toy] [--steps N]
                                       [--providers ...] [--device cuda] [--gradient-checkpointing default|off]

Workloads (docs/design.md "Benchmarks": Qwen2, untied embeddings, random init, fp32; batch 8, 2 PPO epochs,
stop token EOS, temperature 0.7 as TRL's default):
  0.5b    the headline. hidden 896, intermediate 4864, 12 layers, 14 heads, 2 KV heads, vocab 32000; the
          script's own prompts (4-12 tokens), responses of 64 tokens (a random policy emits EOS about once
          in 32000 tokens, so responses run to 64).
  varlen  mid width: hidden 512, intermediate 2048, 8 layers, 8 heads, 2 KV heads, vocab 32000; 64 prompts
          of 8-256 tokens (uniform), responses of up to 256 that stop at EOS: the random policy's EOS row
          of the LM head reads one hidden dimension that a set of trigger tokens write (set_eos_share), so
          each step stops with a fixed probability, sized for a mean response of half the maximum
          (geometric lengths); the table reports the measured mean response (as a share of 256) and the
          padding fraction of the padded batch.
  toy     (labelled toy) hidden 128, intermediate 256, 2 layers, 4 heads, 2 KV heads, vocab 32000 (and 1000
          with --full); the script's prompts, responses of 64.

Sides, each in its own process; every side runs examples/trl_ppo_script.py's main():
  trl                      the script as written (trl==1.12.0's PPOTrainer, policy + reference + value + reward)
  rlhf_fast-trl            the script migrated by its import line: the same four models (varlen: also
                           rlhf_fast-padded, with padding_free=False when PPOConfig has that field)
  rlhf_fast-shared         migrated, with --critic shared --reference_dtype bf16, and no ref_model / value_model
                           passed (the script loads them; the benchmark releases them before the trainer is
                           built, as a script written for this layout would not load them)
  rlhf_fast-packed         (varlen) --padding_free True
  rlhf_fast-packed-budget  (varlen) --padding_free True --micro_batch_token_budget 1024
A side whose PPOConfig field does not exist (yet) reports "not available" instead of running.
The benchmark wraps the script's PPOTrainer only to add a timing callback, swap in the varlen prompts,
hook the padding probe and skip what the script does after training (save_model, generate_completions); the command line sets batch size (8), response length, PPO epochs (2), stop token
(eos), run length (total_episodes), reporting (report_to none, logging_steps 1, save_strategy no,
num_sample_generations 0, no tqdm), use_cpu, bf16 False (fp32) and seed 0: everything else is each
library's default. Gradient checkpointing is left at each side's default behaviour: TRL 1.12's PPO loop
never enables it (its config's True is not acted on); ours decides from its memory predictor, and the
decision is in the note column (--gradient-checkpointing off passes False to both sides).

Time: median wall time per PPO step after the first (TrainerCallback on_train_begin / on_step_end; the
rollout, scoring and update are inside),
20/80 percentiles (min/max below 5 timed steps), from a run with the default allocator. Memory: peak RSS
above the post-import baseline from a second, shorter run with MALLOC_MMAP_THRESHOLD_=65536 (the peak comes
in the first step); on CUDA one run gives both. Padding: a forward hook on the reward model's input
embedding counts pad tokens / tokens of every scoring batch during training (the padding that side
computes on) and reads each row's response length.
Modes: quick (default; run_all's): 2 steps (1 timed) and a 1-step memory run at the 0.5B width; 2 steps and
no memory run for varlen, without the token-budget side; toy V=32000 only, 3 steps. --full: 6 steps (5
timed) and a 2-step memory run; toy V=32000 and 1000, 8 steps. --smoke: tiny shapes, 2 steps, nothing
appended to the CSV (checks that every side runs; the numbers mean nothing).
Durations on an idle 2-core CPU (estimated from component timings, see the README): quick about 11 minutes
(0.5b 6, varlen 3.5, toy 1.5; +1.2 once the padding-free side runs), --full about 36 minutes (0.5b 13,
varlen 20 with all four sides, toy 3).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import tempfile
import types
from pathlib import Path

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

try:  # imported before the memory baseline, so every side carries the same libraries
    import torch
    import transformers  # noqa: F401

    import rlhf_fast.trainer  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:
    import trl.experimental.ppo  # noqa: F401

    TRL_ERROR = None
except Exception as exc:  # noqa: BLE001 - trl missing or incompatible: the side reports it
    TRL_ERROR = f"trl==1.12.0 PPOTrainer unavailable ({exc!r}); pip install 'rlhf_fast[bench]'"

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "trl_ppo_script.py"
TRL_IMPORT = "from trl.experimental.ppo import PPOConfig, PPOTrainer"
OUR_IMPORT = "from rlhf_fast import PPOConfig, PPOTrainer"
BATCH, EPOCHS, TEMPERATURE, PAD, EOS = 8, 2, 0.7, 0, 2
TOKEN_BUDGET = 1024

# Our sides: the PPOConfig fields each adds to the script's command line. A field PPOConfig lacks makes the
# side "not available", except padding_free=False, which is what our trainer does without the field.
OUR_FLAGS = {
    "rlhf_fast-trl": {},
    "rlhf_fast-shared": {"critic": "shared", "reference_dtype": "bf16"},
    "rlhf_fast-padded": {"padding_free": False},
    "rlhf_fast-packed": {"padding_free": True},
    "rlhf_fast-packed-budget": {"padding_free": True, "micro_batch_token_budget": TOKEN_BUDGET},
}
OPTIONAL_FLAGS = {("padding_free", False)}


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    shape: str
    vocab: int
    response: int
    providers: tuple[str, ...]
    prompt_range: tuple[int, int] | None = None  # None: the script's own prompts (4-12 tokens)
    eos_share: float | None = None  # expected response / response, set through the EOS row (None: untouched)
    num_prompts: int = 64
    budget: int = TOKEN_BUDGET
    full_only: tuple[str, ...] = ()  # sides left out of the quick mode

    @property
    def label(self) -> str:
        what = "variable-length " if self.prompt_range else ""
        prompts = f"P{self.prompt_range[0]}-{self.prompt_range[1]}" if self.prompt_range else "P4-12"
        return f"{what}{SHAPE_LABELS[self.shape]} B{BATCH} {prompts} R{self.response} V{self.vocab} ep{EPOCHS}"


FIXED = ("trl", "rlhf_fast-trl", "rlhf_fast-shared")
WORKLOADS = {
    "0.5b": Workload("0.5b", "0.5b", 32000, 64, FIXED),
    "varlen": Workload("varlen", "mid", 32000, 256,
                       ("trl", "rlhf_fast-padded", "rlhf_fast-packed", "rlhf_fast-packed-budget"),
                       prompt_range=(8, 256), eos_share=0.5, full_only=("rlhf_fast-packed-budget",)),
    "toy": Workload("toy", "toy", 32000, 64, FIXED),
    "toy-v1000": Workload("toy-v1000", "toy", 1000, 64, FIXED),
}


def workload(name: str, smoke: bool = False) -> Workload:
    """A workload by name; smoke=True: the same sides and logic on the tiny "smoke" shape and short sequences."""
    w = WORKLOADS[name]
    if not smoke:
        return w
    return dataclasses.replace(w, shape="smoke", vocab=512, response=16 if w.prompt_range else 8,
                               prompt_range=(8, 24) if w.prompt_range else None, num_prompts=24, budget=64)


# ----------------------------------------------------------------------------- models and prompts
def prompt_rows(w: Workload) -> list[dict] | None:
    """The varlen prompts (token ids, uniform lengths in prompt_range), or None for the script's own."""
    if w.prompt_range is None:
        return None
    g = torch.Generator().manual_seed(1234)
    lo, hi = w.prompt_range
    lengths = torch.randint(lo, hi + 1, (w.num_prompts,), generator=g).tolist()
    return [{"input_ids": torch.randint(3, w.vocab, (n,), generator=g).tolist()} for n in lengths]


def stop_rate_for(share: float, response: int) -> float:
    """Per-token stop probability q whose stopping time, capped at ``response``, has mean share x response:
    E[len] = sum_{t<R} (1 - q)^t = (1 - (1 - q)^R) / q (bisection)."""
    lo, hi = 1e-9, 1.0
    for _ in range(100):
        q = (lo + hi) / 2
        lo, hi = (q, hi) if (1 - (1 - q) ** response) / q > share * response else (lo, q)
    return hi


def _left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, seqs))
    ids = torch.tensor([[PAD] * (L - len(s)) + s for s in seqs])
    return ids, (ids != PAD).long()


@torch.no_grad()
def set_eos_share(model, w: Workload, dim: int = 0, margin: float = 7.0) -> dict:
    """Make the random policy stop at EOS after about ``w.eos_share`` x ``w.response`` tokens on average, with
    geometric (memoryless) lengths. Hidden dimension ``dim`` becomes a private channel from the token to
    the EOS logit: no layer writes it (that row of every o_proj and down_proj is zeroed), a set S of
    trigger tokens has 1.0 there in the embedding and every other token 0, and the EOS row of the LM head
    becomes c x the unit vector of that dimension. After a token of S the EOS logit exceeds the log-sum of
    the others by ``margin`` (EOS follows almost surely); after any other token it is 0 (as likely as any
    token). Each step then stops with the probability of sampling a token of S: S is sized from the
    sampling probabilities along the model's own samples (8 prompts, EOS suppressed) for the target mean.
    Returns what it chose."""
    V, R = w.vocab, w.response
    g = torch.Generator().manual_seed(99)
    order = torch.randperm(V - 3, generator=g) + 3  # candidate triggers: never <pad>, <unk>, <eos>
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[dim] = 0.0
        layer.mlp.down_proj.weight[dim] = 0.0
    emb[:, dim] = 0.0
    head[EOS] = 0.0
    ids, mask = _left_pad([r["input_ids"] for r in prompt_rows(w)[:8]])
    torch.manual_seed(99)
    ids = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_k=0,
                         top_p=1.0, max_new_tokens=R, min_new_tokens=R, suppress_tokens=[EOS], pad_token_id=PAD)
    mask = torch.cat([mask, torch.ones_like(ids[:, mask.shape[1]:])], 1)
    L = ids.shape[1]

    def response_logits():
        h = model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        h = h.last_hidden_state[:, L - R - 1:L - 1]  # the positions whose logits sample response tokens
        logits = (h @ head.T) / TEMPERATURE
        logits[..., EOS] = -math.inf
        return logits, h[..., dim] / TEMPERATURE

    logits, _ = response_logits()
    q = stop_rate_for(w.eos_share, R)
    mass = torch.softmax(logits, -1).mean((0, 1))[order].cumsum(0)  # P(sampling one of the first n candidates)
    n = max(1, int(torch.searchsorted(mass, torch.tensor(q))) + 1)
    emb[order[:V // 4], dim] = 1.0  # a quarter of the vocabulary as triggers, to measure c on many positions
    logits, hk = response_logits()
    trig = torch.isin(ids[:, L - R - 1:L - 1], order[:V // 4])
    rest = torch.logsumexp(logits, -1)
    c = float((rest[trig].quantile(0.95) + margin) / hk[trig].quantile(0.05).clamp(min=1e-3))
    emb[:, dim] = 0.0
    emb[order[:n], dim] = 1.0
    head[EOS, dim] = c
    return {"triggers": n, "c": c, "stop_rate": q}


def models_for(w: Workload) -> str:
    """Write (once) and return the workload's model directory (sft/ + rm/)."""
    tag = f"_eos{w.eos_share:g}R{w.response}P{w.prompt_range[0]}-{w.prompt_range[1]}" if w.eos_share else ""
    edit = (lambda model, tok: set_eos_share(model, w)) if w.eos_share else None
    return write_models(bench_model_dir(f"ppo_{w.shape}_v{w.vocab}{tag}"), w.shape, w.vocab, edit_policy=edit)


# ----------------------------------------------------------------------------- one side
class PaddingProbe:
    """Forward hook on the reward model's input embedding while training runs: pad tokens / tokens over
    the scoring batches, and the response length of each row whose prompt it recognises (a padded row
    holds one prompt and its response; a packed row is not read)."""

    def __init__(self, prompts: list[list[int]], response: int):
        self.prompt_len = {tuple(p[:4]): len(p) for p in prompts}
        self.response, self.active = response, False
        self.tokens = self.pads = 0
        self.lengths: list[int] = []

    def __call__(self, module, inputs, output):
        if not self.active or not inputs or not torch.is_tensor(inputs[0]):
            return
        ids = inputs[0].detach().cpu()
        self.tokens += ids.numel()
        self.pads += int((ids == PAD).sum())
        for row in ids.view(-1, ids.shape[-1]):
            where = (row != PAD).nonzero().flatten()
            if where.numel() == 0:
                continue
            seq = row[int(where[0]):int(where[-1]) + 1].tolist()
            n = len(seq) - self.prompt_len.get(tuple(seq[:4]), len(seq) + 1)
            if 0 <= n <= self.response:
                self.lengths.append(n)

    def stats(self) -> dict:
        out = {"pad_frac": self.pads / self.tokens if self.tokens else None}
        if self.lengths:
            out["resp_share"] = sum(self.lengths) / len(self.lengths) / self.response
        return out


def load_script(ours: bool) -> types.ModuleType:
    """examples/trl_ppo_script.py as a module: as written (TRL) or with its import line migrated (ours)."""
    src, line = SCRIPT.read_text(), f"\n{TRL_IMPORT}  #"
    if ours:
        if src.count(line) != 1:
            raise RuntimeError(f"{SCRIPT} no longer has exactly one import line {TRL_IMPORT!r}")
        src = src.replace(line, f"\n{OUR_IMPORT}  #")
    mod = types.ModuleType(f"trl_ppo_script_{'ours' if ours else 'trl'}")
    mod.__file__ = str(SCRIPT)
    exec(compile(src, str(SCRIPT), "exec"), mod.__dict__)  # noqa: S102 - our own example script
    return mod


def _release(model) -> None:
    """Free a model's weights in place (the script still holds the object): a side that does not use it."""
    if model is not None:
        model.to("meta")


def _checkpointing(trainer) -> str:
    msgs = getattr(trainer, "log_messages", None)
    if msgs is None:
        return "off"  # TRL 1.12's PPO loop never calls gradient_checkpointing_enable
    said = [m for m in msgs if m.startswith("gradient_checkpointing=None")]
    if said:
        return "on" if "checkpointing on" in said[-1] else "off"
    return "on" if trainer.args.gradient_checkpointing else "off"


def config_flags(provider: str, budget: int = TOKEN_BUDGET) -> tuple[dict, list[str]]:
    """(PPOConfig fields this side of ours sets, the ones among them PPOConfig does not have yet)."""
    from rlhf_fast.trainer import PPOConfig

    have = {f.name for f in dataclasses.fields(PPOConfig)}
    flags, missing = {}, []
    for k, v in OUR_FLAGS[provider].items():
        if k in have:
            flags[k] = budget if k == "micro_batch_token_budget" else v
        elif (k, v) not in OPTIONAL_FLAGS:
            missing.append(k)
    return flags, missing


def not_available(missing: list[str]) -> dict:
    return {"error": f"not available: PPOConfig has no {', '.join(missing)}"}


def side(provider: str, workload_name: str, steps: int, model_dir: str, device: str = "cpu", smoke: bool = False,
         checkpointing: str = "default") -> dict:
    """One side: run the script's main() for ``steps`` PPO steps; per-step times, padding, checkpointing."""
    from transformers import TrainerCallback

    w = workload(workload_name, smoke)
    ours = provider != "trl"
    if not ours and TRL_ERROR:
        return {"error": TRL_ERROR}
    flags, missing = config_flags(provider, w.budget) if ours else ({}, [])
    if missing:
        return not_available(missing)
    mod = load_script(ours)
    real_trainer, varlen = mod.PPOTrainer, prompt_rows(w)
    stamps, made = [], []
    probe = PaddingProbe([], w.response)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(clock())
            probe.active = True

        def on_step_end(self, *a, **k):
            stamps.append(clock())

        def on_train_end(self, *a, **k):
            probe.active = False

    def make_trainer(**kw):
        from datasets import Dataset

        if varlen is not None:
            kw["train_dataset"] = Dataset.from_list(varlen)
        if provider == "rlhf_fast-shared":  # the layout a script written for it would pass
            _release(kw.pop("ref_model", None))
            _release(kw.pop("value_model", None))
        probe.prompt_len = PaddingProbe(list(kw["train_dataset"]["input_ids"]), w.response).prompt_len
        kw["reward_model"].get_input_embeddings().register_forward_hook(probe)
        trainer = real_trainer(callbacks=[Clock()], **kw)
        # what the script does after training (save the policy, sample completions) is not timed: skip it
        trainer.save_model = trainer.generate_completions = lambda *a, **k: None
        made.append(trainer)
        return trainer

    mod.PPOTrainer = make_trainer
    out = tempfile.mkdtemp(prefix=f"bench_ppo_{provider}_")
    argv = ["--model_dir", model_dir, "--num_prompts", str(max(w.num_prompts, 16)), "--output_dir", out,
            "--per_device_train_batch_size", str(BATCH), "--gradient_accumulation_steps", "1", "--num_mini_batches", "1",
            "--num_ppo_epochs", str(EPOCHS), "--total_episodes", str(BATCH * steps), "--response_length",
            str(w.response), "--stop_token", "eos", "--report_to", "none", "--save_strategy", "no",
            "--num_sample_generations", "0", "--logging_steps", "1", "--disable_tqdm", "True", "--bf16", "False",
            "--seed", "0"]
    argv += ["--use_cpu"] if device == "cpu" else []
    argv += ["--gradient_checkpointing", "False"] if checkpointing == "off" else []
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    try:
        mod.main(argv)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {**step_stats(stamps), **probe.stats(), "checkpointing": _checkpointing(made[-1])}


# ----------------------------------------------------------------------------- the comparison
def _note(r: dict) -> str:
    parts = []
    if r.get("pad_frac") is not None:
        parts.append(f"pad {100 * r['pad_frac']:.0f}%")
    if r.get("resp_share") is not None:
        parts.append(f"mean response {100 * r['resp_share']:.0f}% of max")
    if r.get("checkpointing"):
        parts.append(f"checkpointing {r['checkpointing']}")
    if r.get("timed_steps"):
        parts.append(f"{r['timed_steps']} timed steps")
    if r.get("cpu_ms"):
        parts.append(f"cpu_ms={r['cpu_ms']:.0f}")
    return "; ".join(parts)


def _spread(r: dict) -> str:
    return f"{r['time_ms'] / 1e3:.2f} s [{r['time_p20_ms'] / 1e3:.2f}, {r['time_p80_ms'] / 1e3:.2f}]"


def compare(w: Workload, res: dict[str, dict]) -> list[str]:
    """Ratio lines: every ours side against TRL (speed-up, memory ratio), packed against our padded path."""
    lines, base, padded = [], res.get("trl", {}), res.get("rlhf_fast-padded", {})
    for p, r in res.items():
        if "time_ms" not in r:
            lines.append(f"[{w.name}] {p}: {r.get('error', 'no result')}")
            continue
        for other, b in (("trl", base), ("rlhf_fast-padded", padded)):
            if p == other or "time_ms" not in b or (other == "rlhf_fast-padded" and "packed" not in p):
                continue
            lines.append(f"[{w.name}] {p} vs {other}: {ratio(b['time_ms'], r['time_ms'])}x faster per step "
                         f"({_spread(r)} vs {_spread(b)}); memory {ratio(r.get('mem_bytes'), b.get('mem_bytes'))}x")
    if w.prompt_range:
        pad, share = base.get("pad_frac"), base.get("resp_share")
        lines.append(f"[{w.name}] padded batch (trl): {'n/a' if pad is None else f'{100 * pad:.0f}%'} padding; mean "
                     f"response {'n/a' if share is None else f'{100 * share:.0f}%'} of {w.response}")
    return lines


def run_workload(w: Workload, steps: int, mem_steps: int, device: str, smoke: bool, providers=None,
                 checkpointing: str = "default", side_runner=run_side) -> tuple[list[dict], list[str]]:
    model_dir = models_for(w)
    res = {}
    for p in providers or w.providers:
        if p not in w.providers:
            continue
        missing = config_flags(p)[1] if p != "trl" else []
        res[p] = (not_available(missing) if missing else
                  side_runner("benchmarks.bench_ppo_e2e:side", steps=steps, mem_steps=mem_steps, device=device,
                              provider=p, workload_name=w.name, model_dir=model_dir, smoke=smoke,
                              checkpointing=checkpointing, timeout=4 * 3600))
    rows = []
    for p, r in res.items():
        per_s = BATCH / (r["time_ms"] * 1e-3) if "time_ms" in r else None
        rows.append(make_row("ppo_e2e", "ppo_step", w.label, "float32", p, r, device, per_s, "episodes/s", _note(r)))
    return rows, compare(w, res)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="6 steps per side (5 timed), 2-step memory runs")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: check that every side runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workload", nargs="*", default=None, choices=sorted(WORKLOADS),
                    help="default: 0.5b varlen toy (and toy-v1000 with --full)")
    ap.add_argument("--steps", type=int, default=None, help="PPO steps per timed run (the first is not timed)")
    ap.add_argument("--mem-steps", type=int, default=None, help="PPO steps of the memory run (0: none)")
    ap.add_argument("--providers", nargs="*", default=None, help="subset of each workload's sides")
    ap.add_argument("--gradient-checkpointing", choices=("default", "off"), default="default")
    args = ap.parse_args(argv)
    names = args.workload or (["0.5b", "varlen", "toy"] + (["toy-v1000"] if args.full else []))
    rows, summary = [], []
    for name in names:
        w = workload(name, args.smoke)
        toy = w.shape == "toy"
        steps = args.steps or (8 if toy and args.full else 3 if toy else 6 if args.full else 2)
        mem_steps = args.mem_steps if args.mem_steps is not None else (
            steps if toy else 2 if args.full else 0 if w.prompt_range and not args.smoke else 1)
        providers = args.providers or [p for p in w.providers if args.full or args.smoke or p not in w.full_only]
        r, s = run_workload(w, steps, mem_steps, args.device, args.smoke, providers, args.gradient_checkpointing)
        rows += r
        summary += s
    print_table(rows, cols=("shape", "provider", "time_ms", "time_p20_ms", "time_p80_ms", "mem_bytes", "note"))
    for line in summary:
        print(line)
    if not args.smoke:
        append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
