"""Stage directories: COMPLETE marker written last, unfinished ones refused, failures leave the old output."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rlhf_fast.stages.io import (
    COMPLETE_MARKER,
    StageDirectory,
    StageNotFinishedError,
    StageOutputError,
    require_finished_stage,
    save_stage,
)


def test_save_and_require(tmp_path, make_tiny_lm, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "runs" / "sft"
    model = make_tiny_lm(hidden_size=16)
    save_stage(model, tiny_tokenizer, out, {"final_eval_loss": 1.5}, stage="sft")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER} <= names
    summary = require_finished_stage(out, stage="sft")
    assert summary["stage"] == "sft" and summary["final_eval_loss"] == 1.5 and "finished_at" in summary
    assert json.loads((out / COMPLETE_MARKER).read_text()) == summary
    again = AutoModelForCausalLM.from_pretrained(out)
    assert again.config.hidden_size == 16
    assert AutoTokenizer.from_pretrained(out).pad_token == "<pad>"
    assert [p.name for p in out.parent.iterdir()] == ["sft"]  # no temporary sibling left behind
    with pytest.raises(StageNotFinishedError, match="holds the output of stage 'sft', expected 'rm'"):
        require_finished_stage(out, stage="rm")


def test_directory_without_marker_is_refused(tmp_path, make_tiny_lm):
    d = tmp_path / "half"
    make_tiny_lm(hidden_size=16).save_pretrained(d)  # a complete-looking HF dir, but no COMPLETE
    with pytest.raises(StageNotFinishedError) as e:
        require_finished_stage(d, stage="sft")
    msg = str(e.value)
    assert str(d) in msg and "no COMPLETE marker" in msg and "rlhf-fast sft" in msg
    with pytest.raises(StageNotFinishedError, match=rf"'{tmp_path / 'missing'}' does not exist"):
        require_finished_stage(tmp_path / "missing")
    (d / COMPLETE_MARKER).write_text("{not json")
    with pytest.raises(StageNotFinishedError, match="not a valid stage summary"):
        require_finished_stage(d)


def test_failed_stage_leaves_previous_output_intact(tmp_path, make_tiny_lm, tiny_tokenizer):
    out = tmp_path / "sft"
    save_stage(make_tiny_lm(seed=1, hidden_size=16), tiny_tokenizer, out, {"run": 1}, stage="sft")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with StageDirectory(out, stage="sft") as d:
            (d.path / "metrics.jsonl").write_text('{"step": 1}\n')
            assert not str(d.path).startswith(str(out) + os.sep) and d.path.name.startswith(".sft.tmp-")
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]
    assert require_finished_stage(out)["run"] == 1


def test_finished_stage_is_replaced_by_the_next_run(tmp_path, make_tiny_lm, tiny_tokenizer):
    out = tmp_path / "sft"
    save_stage(make_tiny_lm(seed=1, hidden_size=16), tiny_tokenizer, out, {"run": 1}, stage="sft")
    (out / "stale.txt").write_text("from run 1")
    save_stage(make_tiny_lm(seed=2, hidden_size=32), tiny_tokenizer, out, {"run": 2}, stage="sft")
    assert require_finished_stage(out)["run"] == 2 and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_refuses_to_replace_a_directory_that_is_not_a_stage(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(StageOutputError, match="not a finished stage directory .* refusing to replace it"):
        StageDirectory(tmp_path)
    StageDirectory(tmp_path / "empty_or_new")  # fine


def test_killed_stage_leaves_previous_output_intact(tmp_path, make_tiny_lm, tiny_tokenizer):
    out = tmp_path / "rm"
    save_stage(make_tiny_lm(seed=1, hidden_size=16), tiny_tokenizer, out, {"run": 1}, stage="rm")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = textwrap.dedent(f"""
        import os, signal
        from rlhf_fast.stages.io import StageDirectory
        with StageDirectory({str(out)!r}, stage="rm") as d:
            (d.path / "metrics.jsonl").write_text("partial\\n")
            (d.path / "model.safetensors").write_bytes(b"half written")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    leftovers = [p for p in tmp_path.iterdir() if p.name != "rm"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".rm.tmp-")
    with pytest.raises(StageNotFinishedError, match="no COMPLETE marker"):
        require_finished_stage(leftovers[0])
