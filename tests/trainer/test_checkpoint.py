"""Exact resume, atomic checkpoints, and checkpoints that refuse to load into the wrong run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlhf_fast.trainer.checkpoint import list_checkpoints, resolve_checkpoint
from tests.trainer._resume_worker import build
from tests.utils import REPO


def run_worker(out, mode, *extra, nproc=1, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "tests.trainer._resume_worker", str(out), mode, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tests.trainer._resume_worker", str(out), mode, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load(out, mode):
    return torch.load(out / f"weights_{mode}.pt"), json.loads((out / f"history_{mode}.json").read_text())


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_worker(straight, "straight")
    run_worker(split, "first", "--stop-after", "2")
    assert [p.name for p in list_checkpoints(split / "run")] == ["checkpoint-1", "checkpoint-2"]
    run_worker(split, "resume")
    w_a, h_a = load(straight, "straight")
    w_b, h_b = load(split, "resume")
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), k
    assert h_a == h_b  # metrics of all 4 steps (the first two come back from the checkpoint's history)


def test_checkpoint_contents_and_keep_last_k(tmp_path):
    tr = build(tmp_path / "run")
    tr.args.save_total_limit = 2
    tr.train()
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["checkpoint-3", "checkpoint-4"]
    files = {p.name for p in ckpts[-1].iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json",
            "hf_trainer_state.json", "COMPLETE"} <= files
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["sampler"]["position"] == 32 and state["kl_controller"]["kind"] == "adaptive"
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_mismatched_or_damaged_checkpoints_are_refused_before_touching_weights(tmp_path):
    tr = build(tmp_path / "run", total_steps=2)
    tr.train()
    ck = list_checkpoints(tmp_path / "run")[-1]

    other = build(tmp_path / "run", global_batch=16, total_steps=2)  # another run config
    before = {n: p.detach().clone() for n, p in other.model.named_parameters()}
    with pytest.raises(ValueError, match="does not match this run: batch_size"):
        other.train(resume_from_checkpoint=str(ck))
    assert all(torch.equal(before[n], p) for n, p in other.model.named_parameters())

    truncated = tmp_path / "truncated"
    import shutil

    shutil.copytree(ck, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    fresh = build(tmp_path / "run", total_steps=2)
    with pytest.raises(ValueError, match="unreadable or truncated"):
        fresh.train(resume_from_checkpoint=str(truncated))
    (truncated / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing model.safetensors"):
        fresh.train(resume_from_checkpoint=str(truncated))
    (truncated / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint(tmp_path, truncated)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        resolve_checkpoint(tmp_path / "empty", True)


KILL_SCRIPT = r'''
import os, sys, time
from pathlib import Path
import safetensors.torch as st
from tests.trainer._resume_worker import build
out = Path(sys.argv[1])
tr = build(out / "run", total_steps=3)
tr.args.save_steps = 1
real = st.save_file
def slow_save(*a, **k):
    real(*a, **k)
    if tr.state.global_step == 2:
        print("WRITING", flush=True)
        time.sleep(60)  # killed here, in the middle of writing checkpoint-2
st.save_file = slow_save
tr.train()
'''


def test_killed_writer_leaves_previous_checkpoint_intact(tmp_path):
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:
        if "WRITING" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"]
    assert list(run.glob(".tmp-checkpoint-2-*"))  # the half-written one, never renamed into place
    tr = build(run, total_steps=3)
    tr.train(resume_from_checkpoint=True)  # resumes from checkpoint-1 and finishes
    assert tr.state.global_step == 3


SIGTERM_SCRIPT = r'''
import sys
from pathlib import Path
from transformers import TrainerCallback
from tests.trainer._resume_worker import build
class Announce(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        print(f"STEP {state.global_step}", flush=True)
out = Path(sys.argv[1])
tr = build(out / "run", total_steps=50, callbacks=[Announce()])
tr.args.save_steps = tr.state.save_steps = 1000  # only the signal makes it save
tr.train()
print("EXITED CLEANLY", flush=True)
'''


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_saves_the_last_completed_step_and_exits_cleanly(tmp_path, sig):
    script = tmp_path / "sig.py"
    script.write_text(SIGTERM_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("STEP 1"):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "EXITED CLEANLY" in out
    ckpts = list_checkpoints(tmp_path / "run")
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert 1 <= step < 50 and f"stopped after step {step}" in out
    tr = build(tmp_path / "run", total_steps=50)
    from rlhf_fast.trainer.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(tmp_path / "run", True) == ckpts[0]
    assert tr.state.global_step == 0
