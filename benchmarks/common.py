"""What the benchmark scripts share besides measurement (which is ``rlhf_fast.measure``: ``time_fn``,
``run_isolated``, ``run_timed_and_measured``, ``mark_baseline``; docs/design.md "Benchmarks").

- ``make_row(...)`` builds one results row (device name and versions included);
  ``append_rows(rows)`` appends to benchmarks/results/results.csv; ``print_table(rows)``; ``ratio``.
- ``tiny_qwen2_config(vocab)`` and ``word_tokenizer(vocab)``: docs/design.md's toy model and its tokenizer.
"""
from __future__ import annotations

import csv
import datetime as _dt
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


# ----------------------------------------------------------------------------- docs/design.md's toy model
def tiny_qwen2_config(vocab: int):
    """docs/design.md's toy benchmark model: Qwen2, hidden 128, intermediate 256, 2 layers, 4 heads, 2 KV heads,
    untied embeddings; <pad> = 0, <eos> = 2. Every end-to-end comparison is taken on this one config."""
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=512,
                       pad_token_id=0, eos_token_id=2, bos_token_id=None)


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
