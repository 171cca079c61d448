"""The measurement helpers (rlhf_fast.measure): isolated sides report time and memory; and the benchmarks'
own helper (benchmarks.common): rows land in the CSV; plots render."""
import csv

from benchmarks import common
from rlhf_fast import measure


def alloc_side(mib: int, device: str = "cpu") -> dict:
    import torch

    measure.mark_baseline(device)
    buf = torch.ones(mib * 2**20 // 4)  # touched, so it is resident
    return {"sum": float(buf[:10].sum()), **measure.time_fn(lambda: buf.add_(0), warmup=1, repeats=3)}


def failing_side(device: str = "cpu") -> dict:
    raise MemoryError("pretend out of memory")


def test_isolated_side_measures_memory_above_baseline():
    small = measure.run_isolated("tests.test_benchmark_helper:alloc_side", mib=8)
    big = measure.run_isolated("tests.test_benchmark_helper:alloc_side", mib=96)
    assert small["sum"] == 10.0 and small["time_ms"] > 0
    assert 6 * 2**20 <= small["mem_bytes"] <= 40 * 2**20, small
    assert 90 * 2**20 <= big["mem_bytes"] <= 140 * 2**20, big


def test_failed_side_reports_an_error_instead_of_raising():
    res = measure.run_isolated("tests.test_benchmark_helper:failing_side")
    assert "error" in res and "pretend out of memory" in res["error"]


def test_isolated_benchmark_side_runs_from_any_directory(tmp_path, monkeypatch):
    """The child imports rlhf_fast.measure and the benchmarks package wherever the caller runs."""
    monkeypatch.chdir(tmp_path)
    res = measure.run_isolated("benchmarks.bench_masked_mean:side", provider="rlhf_fast", B=4, T=64)
    assert "error" not in res and res["time_ms"] > 0 and res["mem_bytes"] >= 0, res


def test_time_fn_percentiles_are_ordered():
    r = measure.time_fn(lambda: sum(range(1000)), warmup=1, repeats=9)
    assert r["time_p20_ms"] <= r["time_ms"] <= r["time_p80_ms"] and r["repeats"] >= 9


def test_rows_append_to_csv_and_plot(tmp_path):
    path = tmp_path / "results.csv"
    res = {"time_ms": 2.0, "mem_bytes": 1 << 20}
    rows = [common.make_row("demo", "op", "4x4", "float32", p, res, achieved=1.5, unit="GB/s") for p in ("a", "b")]
    common.append_rows(rows, path)
    common.append_rows(rows[:1], path)
    got = list(csv.DictReader(path.open()))
    assert [r["provider"] for r in got] == ["a", "b", "a"]
    assert got[0]["device"] and got[0]["torch"] and got[0]["time_ms"] == "2"
    from benchmarks import plot

    pngs = plot.main(["--csv", str(path), "--out", str(tmp_path)])
    assert pngs and pngs[0].read_bytes()[:4] == b"\x89PNG"
