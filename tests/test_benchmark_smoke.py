"""The realistic benchmarks run a step in smoke mode (tiny shapes, in this process): every side of
bench_ppo_e2e (the TRL example script under TRL and migrated), bench_dpo and bench_decode, the
variable-length workload's EOS rate and padding probe, and the step statistics. Timings are never asserted."""
import importlib

import pytest
import torch

from benchmarks import bench_decode, bench_dpo, bench_ppo_e2e, common


@pytest.fixture(autouse=True)
def _models_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BENCH_MODELS", str(tmp_path / "models"))


def in_process(target, steps, mem_steps=None, device="cpu", timeout=None, **kwargs):
    """run_side's signature, the side called here (no subprocess, no memory run)."""
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)(steps=steps, device=device, **kwargs)


def test_step_stats_drop_the_first_step():
    stamps = [(0.0, 0.0), (5.0, 1.0), (6.0, 2.0), (8.0, 3.0), (9.0, 4.0), (10.0, 5.0), (11.0, 6.0)]
    s = common.step_stats(stamps)
    assert s["timed_steps"] == 5 and s["time_ms"] == 1000.0 and s["first_step_ms"] == 5000.0
    assert s["time_p20_ms"] <= s["time_ms"] <= s["time_p80_ms"] and s["cpu_ms"] == 1000.0
    assert common.step_stats(stamps[:2]) == {"timed_steps": 0, "first_step_ms": 5000.0}
    assert "error" in common.step_stats(stamps[:1])


def test_varlen_policy_stops_after_a_trigger_token_only():
    w = bench_ppo_e2e.workload("varlen", smoke=True)
    torch.manual_seed(0)
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(common.qwen2_config(w.shape, w.vocab)).eval()
    chose = bench_ppo_e2e.set_eos_share(model, w)
    trig = (model.get_input_embeddings().weight[:, 0] == 1.0).nonzero().flatten()
    assert len(trig) == chose["triggers"] > 0 and bench_ppo_e2e.EOS not in trig.tolist()
    other = next(t for t in range(3, w.vocab) if t not in set(trig.tolist()))
    ids = torch.tensor([[5, 6, 7, int(trig[0])], [5, 6, 7, other]])
    with torch.no_grad():
        p = torch.softmax(model(ids).logits[:, -1] / bench_ppo_e2e.TEMPERATURE, -1)[:, bench_ppo_e2e.EOS]
    assert p[0] > 0.99 and p[1] < 0.01
    q = bench_ppo_e2e.stop_rate_for(0.5, 256)
    assert abs((1 - (1 - q) ** 256) / q - 128) < 1e-3


def test_ppo_e2e_varlen_workload_runs_every_side(capsys):
    w = bench_ppo_e2e.workload("varlen", smoke=True)
    rows, lines = bench_ppo_e2e.run_workload(w, steps=2, mem_steps=0, device="cpu", smoke=True,
                                             providers=["trl", "rlhf_fast-padded", "rlhf_fast-packed"],
                                             side_runner=in_process)
    got = {r["provider"]: r for r in rows}
    assert set(got) == {"trl", "rlhf_fast-padded", "rlhf_fast-packed"}
    for p in ("trl", "rlhf_fast-padded"):
        assert float(got[p]["time_ms"]) > 0 and "pad " in got[p]["note"] and "mean response" in got[p]["note"], got[p]
        assert got[p]["shape"].startswith("variable-length smoke") and got[p]["device"]
    _, missing = bench_ppo_e2e.config_flags("rlhf_fast-packed")
    if missing:  # the padding-free options have not landed: the side says so instead of crashing
        assert got["rlhf_fast-packed"]["note"].startswith("not available")
    else:
        assert float(got["rlhf_fast-packed"]["time_ms"]) > 0
    assert any("padded batch (trl)" in line for line in lines)
    assert any("rlhf_fast-padded vs trl" in line for line in lines)


def test_ppo_e2e_shared_layout_side_releases_the_unused_models(monkeypatch):
    released, release = [], bench_ppo_e2e._release
    monkeypatch.setattr(bench_ppo_e2e, "_release", lambda m: (released.append(type(m).__name__), release(m)))
    w = bench_ppo_e2e.workload("0.5b", smoke=True)
    r = bench_ppo_e2e.side("rlhf_fast-shared", "0.5b", 2, bench_ppo_e2e.models_for(w), smoke=True)
    assert released == ["Qwen2ForCausalLM", "Qwen2ForSequenceClassification"]  # the script's ref and value models
    assert r["timed_steps"] == 1 and r["time_ms"] > 0 and r["checkpointing"] in ("on", "off")
    # padding_free (our default): the reward model scores one packed row, so the probe sees no padding and
    # no per-row lengths (the TRL side's probe reports the padded batch)
    assert r["pad_frac"] == 0 and "resp_share" not in r


def test_dpo_sides_run_a_step_at_the_smoke_shape():
    model_dir = bench_dpo._model_dir("smoke", 512)
    for provider in ("rlhf_fast", "trl-precompute"):
        r = bench_dpo.side(provider, 512, 2, model_dir)
        assert r["timed_steps"] == 1 and r["time_ms"] > 0 and r["train_loss"] is not None, (provider, r)


def test_decode_sides_and_floor():
    bw = bench_decode.copy_side(mib=4, repeats=2)
    assert bw["bandwidth"] > 0
    for provider in bench_decode.PROVIDERS:
        r = bench_decode.side(provider, "smoke", batch=2, tokens=4, repeats=1)
        assert r["time_ms"] > 0 and r["floor_bytes"] > 0, (provider, r)
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(common.qwen2_config("smoke", 512))  # hidden 32, 1 layer, 2 heads, 1 KV head
    layers = sum(p.numel() for p in model.model.layers.parameters())
    weights = (layers + 32 + 512 * 32) * 4  # layers, final norm, LM head: not the input embedding
    kv = 1 * 2 * 8 * 1 * 16 * 10 * 4  # layers x (K, V) x batch x KV heads x head dim x context x fp32
    assert bench_decode.floor_bytes(model, 8, 10) == weights + kv
