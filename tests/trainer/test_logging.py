"""rlhf_fast.trainer.logging.MetricsLogger: the one metrics writer of the trainers and the stages."""
from __future__ import annotations

import json

import pytest

from rlhf_fast.trainer.logging import MetricsLogger


def test_jsonl_lines_step_first_appended_and_flushed(tmp_path, capsys):
    with MetricsLogger(tmp_path, stdout=False) as metrics:
        metrics.log({"eval_loss": 1.5, "eval_tokens": 7, "eval_accuracy": None}, step=0)
        # flushed per line: readable while the run is still going
        assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
            "step": 0, "eval_loss": 1.5, "eval_tokens": 7, "eval_accuracy": None}
        metrics.log({"skipped_nonfinite": True, "loss": "nan"}, step=3)
    assert capsys.readouterr().out == ""  # stdout=False: the stages keep the console to their tqdm bar
    with MetricsLogger(tmp_path, stdout=False) as again:  # appends
        again.log({"loss": 0.25}, step=4)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 3, "skipped_nonfinite": true, "loss": "nan"}'
    assert [json.loads(x)["step"] for x in lines] == [0, 3, 4]
    assert list(json.loads(lines[0])) == ["step", "eval_loss", "eval_tokens", "eval_accuracy"]


def test_stdout_tensors_disabled_and_unknown_reporter(tmp_path, capsys):
    import torch

    with pytest.warns(UserWarning, match="report_to='mlflow' is not supported"):
        metrics = MetricsLogger(tmp_path / "run", report_to=["mlflow"])
    metrics.log({"loss": torch.tensor(0.5)}, step=2)
    metrics.close()
    assert "[step 2] loss=0.5" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 2, "loss": 0.5}
    off = MetricsLogger(tmp_path / "off", enabled=False)
    off.log({"loss": 1.0}, step=1)
    off.close()
    assert not (tmp_path / "off").exists()
    MetricsLogger(None).log({"loss": 1.0}, step=1)  # no output_dir (a non-main rank): stdout only
