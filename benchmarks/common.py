"""What the benchmark scripts share besides measurement (which is ``rlhf_fast.measure``: ``time_fn``,
``run_isolated``, ``run_timed_and_measured``, ``mark_baseline``; docs/design.md "Benchmarks").

- ``make_row(...)`` builds one results row (device name and versions included);
  ``append_rows(rows)`` appends to benchmarks/results/results.csv; ``print_table(rows)``; ``ratio``.
- ``qwen2_config(shape, vocab)``: docs/design.md's benchmark shapes (``SHAPES``: "0.5b", "mid", "toy", and
  "smoke" for the tests); ``tiny_qwen2_config(vocab)`` is the toy one. ``word_tokenizer(vocab)``: their tokenizer.
- ``write_models(dir, shape, vocab)``: the policy (``sft/``, with the tokenizer) and a sequence-classification
  model (``rm/``) of one shape, written once and reused (random init, seed 0).
- ``clock()`` / ``step_stats(stamps)``: per-step wall and CPU time, median and 20/80 percentiles, first step dropped.
- ``run_side(target, steps, mem_steps)``: ``run_timed_and_measured`` with an optional shorter memory run.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_CSV = RESULTS_DIR / "results.csv"
CSV_FIELDS = [
    "timestamp", "bench", "op", "shape", "dtype", "provider", "device", "torch", "triton", "rlhf_fast",
    "time_ms", "time_p20_ms", "time_p80_ms", "mem_bytes", "achieved", "achieved_unit", "note",
]


# ----------------------------------------------------------------------------- output
def make_row(bench, op, shape, dtype, provider, result: dict, device="cpu", achieved=None, unit="", note="") -> dict:
    from rlhf_fast.measure import device_name, versions  # here: plot.py and summary.py stay torch-free

    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bench": bench, "op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "provider": provider, "device": device_name(device), **versions(),
        "time_ms": _fmt(result.get("time_ms")), "time_p20_ms": _fmt(result.get("time_p20_ms")),
        "time_p80_ms": _fmt(result.get("time_p80_ms")), "mem_bytes": result.get("mem_bytes", ""),
        "achieved": _fmt(achieved), "achieved_unit": unit,
        "note": result.get("error", note),
    }


def _fmt(x):
    return "" if x is None else f"{x:.4g}"


def append_rows(rows: list[dict], path: Path = RESULTS_CSV) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def print_table(rows: list[dict], cols=("op", "shape", "dtype", "provider", "time_ms", "mem_bytes", "achieved", "note")):
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-+-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(_cell(r.get(c)).ljust(widths[c]) for c in cols))


def _cell(v) -> str:
    if isinstance(v, int) and v > 10_000:
        return f"{v / 2**20:.1f} MiB"
    return "" if v is None else str(v)


def ratio(ours, base) -> str:
    try:
        return f"{float(ours) / float(base):.3f}"
    except (TypeError, ValueError, ZeroDivisionError):
        return "n/a"


# ----------------------------------------------------------------------------- per-step timing of a whole run
def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds: CPU time per step is far less sensitive to other users of the machine."""
    return time.perf_counter(), time.process_time()


def step_stats(stamps: list[tuple[float, float]]) -> dict:
    """Per-step times from ``clock()`` stamps: one before the first step, then one at each step's end. The
    first step is dropped (warm-up; a single step gives no time); the others give the median and the 20/80 percentiles in ms (min/max
    below 5 timed steps), the median process CPU time and the number of timed steps."""
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]
    if not steps:
        return {"error": "no step ran"}
    if len(steps) == 1:  # a memory run: nothing to time
        return {"timed_steps": 0, "first_step_ms": steps[0][0] * 1e3}
    wall = [w for w, _ in steps[1:]]
    q = statistics.quantiles(wall, n=5) if len(wall) >= 5 else [min(wall), 0, 0, max(wall)]
    return {"time_ms": statistics.median(wall) * 1e3, "time_p20_ms": q[0] * 1e3, "time_p80_ms": q[3] * 1e3,
            "cpu_ms": statistics.median(c for _, c in steps[1:]) * 1e3, "timed_steps": len(wall),
            "first_step_ms": steps[0][0] * 1e3}


def run_side(target: str, steps: int, mem_steps: int | None = None, device: str = "cpu", **kwargs) -> dict:
    """``rlhf_fast.measure.run_timed_and_measured(target, steps=steps, ...)``, with the memory run (CPU only)
    taking ``mem_steps`` steps instead: the peak is reached within the first step (the optimizer state
    appears in it), so a short memory run saves time without changing the number. mem_steps=0: no memory run."""
    from rlhf_fast.measure import run_isolated, run_timed_and_measured

    cpu = str(device).startswith("cpu")
    if mem_steps is None or mem_steps == steps or not cpu:
        return run_timed_and_measured(target, device=device, steps=steps, **kwargs)
    timed = run_isolated(target, mmap_threshold=False, device=device, steps=steps, **kwargs)
    if "error" in timed or not mem_steps:
        return {**timed, "mem_bytes": None}
    measured = run_isolated(target, device=device, steps=mem_steps, **kwargs)
    if "error" in measured:
        return {**timed, "mem_bytes": None, "error": f"memory run: {measured['error']}"}
    return {**timed, "mem_bytes": measured["mem_bytes"]}


# ----------------------------------------------------------------------------- docs/design.md's shapes
SHAPES = {  # Qwen2, untied embeddings, random init (docs/design.md "Benchmarks")
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=12, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "mid": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=2048),
    "toy": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512),
    # not a benchmark shape: what the smoke tests and --smoke runs use
    "smoke": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=1024),
}
SHAPE_LABELS = {"0.5b": "0.5B-width", "mid": "mid-width", "toy": "toy", "smoke": "smoke"}


def qwen2_config(shape: str, vocab: int):
    """One of ``SHAPES`` as a Qwen2Config with untied embeddings; <pad> = 0, <eos> = 2 (``word_tokenizer``)."""
    from transformers import Qwen2Config

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    return Qwen2Config(**SHAPES[shape], vocab_size=vocab, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
                       bos_token_id=None)


def tiny_qwen2_config(vocab: int):
    """docs/design.md's toy benchmark model: Qwen2, hidden 128, intermediate 256, 2 layers, 4 heads, 2 KV heads,
    untied embeddings; <pad> = 0, <eos> = 2."""
    return qwen2_config("toy", vocab)


def write_models(model_dir: str | os.PathLike, shape: str, vocab: int, reward: bool = True, edit_policy=None) -> str:
    """Write ``sft/`` (causal LM + word-level tokenizer) and, with ``reward``, ``rm/`` (sequence classification,
    one label, + tokenizer) of ``shape`` under model_dir, random init from seed 0; return model_dir.

    Written once: an existing complete directory is reused (each is renamed into place when finished).
    ``edit_policy(model, tokenizer)``, if given, changes the policy before it is saved (encode what it does
    in model_dir's name, since the cache is keyed by the directory)."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    model_dir = Path(model_dir)
    want = [model_dir / "sft"] + ([model_dir / "rm"] if reward else [])
    if all(p.is_dir() for p in want):
        return str(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tok, cfg = word_tokenizer(vocab), qwen2_config(shape, vocab)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(cfg)
    if edit_policy is not None:
        edit_policy(policy, tok)
    models = [(model_dir / "sft", policy)]
    if reward:
        cfg.num_labels = 1
        models.append((model_dir / "rm", Qwen2ForSequenceClassification(cfg)))
    for path, model in models:
        if path.is_dir():
            continue
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=model_dir))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp)
    return str(model_dir)


MODELS_VERSION = 1  # bump when a model writer changes, so no stale cached model is reused


def bench_model_dir(name: str) -> str:
    """Where a benchmark keeps the models it writes (reused across runs): $RLHF_FAST_BENCH_MODELS or the temp dir."""
    root = os.environ.get("RLHF_FAST_BENCH_MODELS") or os.path.join(tempfile.gettempdir(), "rlhf_fast_bench_models")
    return os.path.join(root, f"{name}_m{MODELS_VERSION}")


def word_tokenizer(vocab: int):
    """Word-level tokenizer for the tiny model: <pad> = 0, <unk> = 1, <eos> = 2, words t3 ... t{vocab-1}.

    Special tokens are matched before pre-tokenization, so they must not be prefixes of words ("t2" as EOS
    would split "t27" in two). Reload it with PreTrainedTokenizerFast (AutoTokenizer picks the model's class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
