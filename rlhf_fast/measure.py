"""Timing and memory measurement of a closure or of a whole program (docs/design.md "Benchmarks").

A leaf module: it imports only the standard library and torch, so the benchmarks in a checkout and
commands of the installed package can both use it.

- ``time_fn(fn)``: warm-up then repeats; median and 20/80 percentiles in ms (CUDA events on GPU,
  perf_counter on CPU).
- ``run_isolated("package.module:side_fn", **kwargs)``: runs one side of a comparison in its own
  Python process with ``MALLOC_MMAP_THRESHOLD_=65536`` (otherwise glibc keeps freed buffers and a
  chunked kernel looks ~4x worse than it is). The child (``python -m rlhf_fast.measure --child``)
  imports the module, records the RSS right after imports, resets the high-water mark
  (/proc/self/clear_refs), calls ``side_fn(**kwargs)`` (which returns a dict, typically ``time_fn``
  stats) and adds ``mem_bytes``: peak RSS above the post-import RSS on CPU,
  ``torch.cuda.max_memory_allocated`` on GPU. A side function that claims memory "beyond inputs"
  calls ``mark_baseline(device)`` after building its inputs.
- ``run_timed_and_measured``: the same side twice on CPU, time with the default allocator and memory
  with the mmap threshold.
- ``device_name(device)`` and ``versions()``: what a result row records about the machine;
  ``available_bytes(device)``: free memory, to refuse a run that cannot fit before starting it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

_CHILD_MARK = "RLHF_FAST_MEASURE_RESULT="


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
    """torch, triton and rlhf_fast versions ("-" for triton when it is not installed)."""
    import torch

    try:
        tv = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        tv = "-"
    package = sys.modules.get(__package__ or "")  # rlhf_fast, imported before any of its submodules
    return {"torch": torch.__version__, "triton": tv, "rlhf_fast": getattr(package, "__version__", "-")}


def available_bytes(device: str = "cpu") -> int | None:
    """Free bytes on ``device``: CUDA free memory, or MemAvailable from /proc/meminfo on CPU (None if unknown)."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        m = re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


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


# ----------------------------------------------------------------------------- memory above a baseline
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


# ----------------------------------------------------------------------------- one side in its own process
def _child(target: str, kwargs: dict) -> None:
    mod_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    mark_baseline(kwargs.get("device", "cpu"))  # the RSS right after imports
    out = dict(fn(**kwargs) or {})
    out["mem_bytes"] = peak_above_baseline()
    print(_CHILD_MARK + json.dumps(out), flush=True)


def _import_root(module: str) -> Path | None:
    """The sys.path directory this process imports ``module``'s top-level package from (None if unknown)."""
    top = module.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package: its directory's parent
        return Path(next(iter(spec.submodule_search_locations))).resolve().parent
    return Path(spec.origin).resolve().parent if spec.origin else None


def run_isolated(target: str, timeout: float = 1800, threads: int | None = None, mmap_threshold: bool = True,
                 python: str | None = None, **kwargs) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh process; returns its dict plus ``mem_bytes``.

    The child imports ``module`` and this module from where this process does: it starts in the
    directory holding ``module``'s top-level package (e.g. the checkout for ``benchmarks.bench_x:side``),
    with that directory and the one holding rlhf_fast first on PYTHONPATH.
    On failure (e.g. out of memory) returns {"error": "..."} instead of raising, so a comparison
    can report that one side did not complete. mmap_threshold=False times with the default allocator
    (its mem_bytes then overstates the op's own memory; take memory from a run with it on).
    python: another interpreter for the child (e.g. a venv with a different trl); default ours.
    """
    if target.count(":") != 1:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    env = dict(os.environ)
    if mmap_threshold:  # for memory: freed buffers go back to the OS, so RSS peaks are the op's own
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:  # for time only: the allocator as users run it (reused buffers, no fresh page faults)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("TRITON_INTERPRET", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    target_root = _import_root(target.split(":")[0])
    roots = [str(r) for r in (target_root, Path(__file__).resolve().parent.parent) if r is not None]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                                if p]))
    cmd = [python or sys.executable, "-m", "rlhf_fast.measure", "--child", target, json.dumps(kwargs)]
    try:
        proc = subprocess.run(cmd, cwd=target_root, env=env, capture_output=True, text=True, timeout=timeout)
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


__all__ = ["device_name", "versions", "available_bytes", "time_fn", "mark_baseline", "peak_above_baseline", "run_isolated",
           "measure_peaks", "environment",
           "run_timed_and_measured"]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        # Run through the importable module, not __main__, so the side function's
        # mark_baseline() and ours share one state.
        importlib.import_module("rlhf_fast.measure")._child(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit("usage: python -m rlhf_fast.measure --child module:function JSON_KWARGS (internal)")


# ----------------------------------------------------------------------------- device facts (selfcheck)
def measure_peaks(device: str, copy_elems: int = 2 ** 28, n: int = 8192) -> dict:
    """Achieved device-to-device copy bandwidth (1 GiB of fp32) and bf16 matmul throughput (n^3)."""
    import torch

    a = torch.empty(copy_elems, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), warmup=3, repeats=20, device=device)["time_ms"] / 1e3
    gbs = 2 * a.nbytes / t / 1e9
    a = b = None  # free the copy buffers before the matmul
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: x @ x, warmup=3, repeats=20, device=device)["time_ms"] / 1e3
    return {"GB/s": gbs, "TFLOP/s": 2 * n ** 3 / t / 1e12}


def environment(device: str) -> dict:
    import torch

    from rlhf_fast import _backend

    env = dict(versions())
    env.update(python=platform.python_version(), device=device_name(device), cuda=torch.version.cuda,
               cpp_extension=_backend.HAS_EXT, triton_available=_backend.HAS_TRITON,
               triton_interpret=_backend.TRITON_INTERPRET)
    try:
        import importlib.metadata as md

        env["flash_attn"] = md.version("flash-attn")
    except Exception:
        env["flash_attn"] = None
    for pkg in ("transformers", "liger-kernel"):
        try:
            import importlib.metadata as md

            env[pkg] = md.version(pkg)
        except Exception:
            env[pkg] = None
    if device.startswith("cuda"):
        env["driver"] = _driver_version()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return env


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
