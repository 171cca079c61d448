"""The benchmark helper every script shares (DESIGN.md "Benchmarks").

- ``time_fn(fn)``: warm-up then repeats; median and 20/80 percentiles in ms (CUDA events on GPU,
  perf_counter on CPU).
- ``run_isolated("benchmarks.bench_x:side_fn", **kwargs)``: runs one side of a comparison in its own
  Python process with ``MALLOC_MMAP_THRESHOLD_=65536`` (otherwise glibc keeps freed buffers and a
  chunked kernel looks ~4x worse than it is). The child imports the module, records the RSS right
  after imports, resets the high-water mark (/proc/self/clear_refs), calls ``side_fn(**kwargs)``
  (which returns a dict, typically ``time_fn`` stats) and adds ``mem_bytes``: peak RSS above the
  post-import RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU. A side function that claims
  memory "beyond inputs" calls ``mark_baseline(device)`` after building its inputs.
- ``append_rows(rows)`` appends to benchmarks/results/results.csv; ``print_table(rows)``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_CSV = RESULTS_DIR / "results.csv"
CSV_FIELDS = [
    "timestamp", "bench", "op", "shape", "dtype", "provider", "device", "torch", "triton", "rlhf_fast",
    "time_ms", "time_p20_ms", "time_p80_ms", "mem_bytes", "achieved", "achieved_unit", "note",
]
_CHILD_MARK = "RLHF_FAST_BENCH_RESULT="


# ----------------------------------------------------------------------------- facts
def device_name(device: str = "cpu") -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def versions() -> dict:
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "-"
    import rlhf_fast

    return {"torch": torch.__version__, "triton": tv, "rlhf_fast": rlhf_fast.__version__}


# ----------------------------------------------------------------------------- timing
def time_fn(fn, warmup: int = 2, repeats: int = 10, device: str = "cpu", min_seconds: float = 0.0) -> dict:
    """Time ``fn()``: returns {"time_ms", "time_p20_ms", "time_p80_ms", "repeats"} (median, percentiles)."""
    import torch

    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_seconds:
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * repeats:
            break
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"time_ms": statistics.median(times), "time_p20_ms": q[0], "time_p80_ms": q[3], "repeats": len(times)}


# ----------------------------------------------------------------------------- memory, isolated
def _rss_kib(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


_BASELINE = {"bytes": 0, "cuda": False}


def mark_baseline(device: str = "cpu") -> None:
    """Start measuring memory from now (called by the child after imports, and again by a side
    function after it built its inputs when the claim is "beyond inputs and weights")."""
    import torch

    cuda = str(device).startswith("cuda")
    _BASELINE["cuda"] = cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _BASELINE["bytes"] = torch.cuda.memory_allocated()
    else:
        _BASELINE["bytes"] = _rss_kib("VmRSS") * 1024
        if not _reset_peak_rss():
            _BASELINE["bytes"] = _rss_kib("VmHWM") * 1024  # cannot reset: measure above the old peak


def peak_above_baseline() -> int:
    import torch

    if _BASELINE["cuda"]:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - _BASELINE["bytes"]
    return max(0, _rss_kib("VmHWM") * 1024 - _BASELINE["bytes"])


def _child(target: str, kwargs: dict) -> None:
    mod_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    mark_baseline(kwargs.get("device", "cpu"))  # the RSS right after imports
    out = dict(fn(**kwargs) or {})
    out["mem_bytes"] = peak_above_baseline()
    print(_CHILD_MARK + json.dumps(out), flush=True)


def run_isolated(target: str, timeout: float = 1800, threads: int | None = None, mmap_threshold: bool = True,
                 python: str | None = None, **kwargs) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh process; returns its dict plus ``mem_bytes``.

    On failure (e.g. out of memory) returns {"error": "..."} instead of raising, so a comparison
    can report that one side did not complete. mmap_threshold=False times with the default allocator
    (its mem_bytes then overstates the op's own memory; take memory from a run with it on).
    python: another interpreter for the child (e.g. a venv with a different trl); default ours.
    """
    env = dict(os.environ)
    if mmap_threshold:  # for memory: freed buffers go back to the OS, so RSS peaks are the op's own
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:  # for time only: the allocator as users run it (reused buffers, no fresh page faults)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("TRITON_INTERPRET", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [python or sys.executable, "-m", "benchmarks.common", "--child", target, json.dumps(kwargs)]
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_CHILD_MARK):
            return json.loads(line[len(_CHILD_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else " | ".join(tail)
    return {"error": f"exit {proc.returncode}: {reason}"}


def run_timed_and_measured(target: str, device: str = "cpu", **kwargs) -> dict:
    """One side of an end-to-end comparison, twice on CPU: time from a run with the default allocator
    (as users run it: freed buffers are reused), memory from a run with MALLOC_MMAP_THRESHOLD_ (freed
    buffers go back to the OS, so the RSS peak is the program's own; every large tensor is then a fresh
    mmap, and its page faults cost a training step here ~25%, on both sides). On GPU one run does both.
    kwargs: run_isolated's (timeout, threads, python) and the side's own."""
    timed = run_isolated(target, mmap_threshold=False, device=device, **kwargs)
    if "error" in timed or not str(device).startswith("cpu"):
        return timed
    measured = run_isolated(target, device=device, **kwargs)
    if "error" in measured:
        return {**timed, "error": f"memory run: {measured['error']}"}
    return {**timed, "mem_bytes": measured["mem_bytes"]}


# ----------------------------------------------------------------------------- output
def make_row(bench, op, shape, dtype, provider, result: dict, device="cpu", achieved=None, unit="", note="") -> dict:
    v = versions()
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bench": bench, "op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "provider": provider, "device": device_name(device), **v,
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



# ----------------------------------------------------------------------------- DESIGN.md's tiny model
def tiny_qwen2_config(vocab: int):
    """DESIGN.md's tiny benchmark model: Qwen2, hidden 128, intermediate 256, 2 layers, 4 heads, 2 KV heads,
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


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        # Run through the importable module, not __main__, so the side function's
        # mark_baseline() and ours share one state.
        importlib.import_module("benchmarks.common")._child(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit("usage: python -m benchmarks.common --child module:function JSON_KWARGS (internal)")
