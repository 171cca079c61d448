"""`rlhf-fast selfcheck`: the quick run passes on CPU, a broken op fails it, and its CUDA branch runs
under the Triton interpreter on CPU tensors at small shapes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_fast import _backend, ops, selfcheck
from rlhf_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent
OPS = {"fused_linear_logprobs", "logprobs_from_logits", "kl_penalty(k3)", "token_rewards", "gae", "masked_whiten",
       "masked_mean", "ppo_policy_loss", "value_loss", "policy_loss(gspo)", "rms_norm(+residual)", "swiglu", "rotary"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="not in the interpreter run")
def test_quick_selfcheck_passes_on_cpu_and_imports_only_what_it_needs(tmp_path):
    # not on a bare GPU image (yaml is: huggingface_hub, under transformers, imports it)
    code = ("import sys; from rlhf_fast.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('datasets', 'matplotlib', 'trl', 'flash_attn') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "selfcheck", "--quick", "--json", str(js), "--markdown", str(md)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "HEAVY []" in proc.stdout and "selfcheck: PASS" in proc.stdout
    report = json.loads(js.read_text())
    assert report["ok"] and report["quick"]
    names = {c["name"].split(" ")[0] for c in report["checks"] if c["section"] == "ops"}
    assert names == OPS
    backends = {c["name"].rsplit("[", 1)[1] for c in report["checks"] if c["section"] == "ops"}
    assert backends == ({"cpp]", "torch]"} if _backend.HAS_EXT else {"torch]"})
    assert any(c["section"] == "packing" and c["ok"] for c in report["checks"])
    assert not any(c["section"] == "ppo_step" for c in report["checks"])  # no 0.5B step in --quick
    assert md.read_text().startswith("# rlhf-fast selfcheck: PASS")
    assert {"torch", "triton", "flash_attn", "cuda", "device"} <= set(report["environment"])


def test_broken_op_is_a_mismatch_and_exits_nonzero(monkeypatch, tmp_path, capsys):
    real = ops.swiglu
    monkeypatch.setattr(ops, "swiglu", lambda g, u, backend=None: real(g, u, backend=backend) * 1.01)
    monkeypatch.setattr(selfcheck, "check_packing", lambda device: selfcheck.Check("packing", "skipped", True))
    rc = main(["selfcheck", "--quick", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 1 and "selfcheck: FAIL" in out and "mismatch: [ops] swiglu" in out
    failed = [c["name"] for c in json.loads((tmp_path / "r.json").read_text())["checks"] if not c["ok"]]
    assert failed and all(n.startswith("swiglu") for n in failed)


def test_an_op_that_raises_is_reported_not_fatal(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(ops, "gae", boom)
    checks = selfcheck.run_op_checks("cpu", "torch", "tiny")
    bad = [c for c in checks if not c.ok]
    assert [c.name.split()[0] for c in bad] == ["gae"] and "kernel exploded" in bad[0].detail["error"]


def test_memory_mismatch_fails_the_ppo_step(monkeypatch):
    from rlhf_fast.memory import micro_step

    real = micro_step.compare_measured
    monkeypatch.setattr(micro_step, "compare_measured",
                        lambda *a: {**real(*a), "grads": 2 * real(*a)["grads"]})
    cfg = selfcheck._tiny_config(hidden_size=64, intermediate_size=128, vocab_size=500)
    checks = {c.name: c for c in selfcheck.ppo_step_0p5b("cpu", steps=1, config=cfg, lengths=(4, 8))}
    assert checks["memory: params"].ok and checks["memory: activations"].ok
    assert not checks["memory: grads"].ok and checks["memory: grads"].detail["off"] == pytest.approx(0.5)
    assert any(n.startswith("PPO step") and c.detail["tokens_per_s"] > 0 for n, c in checks.items())


def test_graphed_decode_check_runs_the_compiled_step_and_catches_a_wrong_one(monkeypatch):
    """The CUDA section's decode check on CPU with aot_eager (CUDA graphs need a GPU): it passes on the real
    step, fails when the compiled step gives other logits, and reports both timings."""
    cfg = selfcheck._tiny_config()
    check = selfcheck.check_graphed_decode("cpu", "aot_eager", config=cfg, batch=3, prompt_len=5, steps=4)
    assert check.ok and check.detail["max_err"] <= check.detail["tolerance"], check.detail
    assert check.detail["eager_ms_per_token"] > 0 and check.detail["compiled_ms_per_token"] > 0
    from rlhf_fast.models import decode

    monkeypatch.setattr(decode, "compiled_decode_step", lambda mode: lambda dec, tok, t: dec.step(tok) + 1.0)
    assert not selfcheck.check_graphed_decode("cpu", "aot_eager", config=cfg, batch=3, prompt_len=5, steps=4).ok


@pytest.mark.interpret
def test_cuda_branch_under_the_interpreter():
    peaks: dict = {}
    checks = selfcheck.gpu_op_checks("cpu", "small", peaks, peak_sizes=(2 ** 16, 64))
    assert all(c.ok for c in checks), [(c.name, c.detail) for c in checks if not c.ok]
    assert peaks["GB/s"] > 0 and peaks["TFLOP/s"] > 0
    ops_checks = [c for c in checks if c.section == "ops"]
    assert {c.name.split(" ")[0] for c in ops_checks} == OPS
    for dt in ("bfloat16", "float16", "float32"):
        assert any(dt in c.name for c in ops_checks)
    lp = next(c for c in ops_checks if c.name.startswith("fused_linear_logprobs") and "bfloat16" in c.name)
    assert {"ours_ms", "torch_ms", "GB/s", "TFLOP/s", "flops_fraction"} <= set(lp.detail)
    assert all(c.name.endswith("[triton]") for c in ops_checks)


def test_markdown_lists_failures():
    rep = {"ok": False, "quick": True, "extension": "built", "environment": {"device": "cpu"}, "peaks": {},
           "seconds": 1.0, "checks": [selfcheck.Check("ops", "x", False, {"max_err": 1.0}).as_dict()]}
    md = selfcheck.format_markdown(rep)
    assert md.startswith("# rlhf-fast selfcheck: FAIL") and "| x | **FAIL** | 1 |" in md
