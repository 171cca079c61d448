"""`rlhf-fast memory` (rlhf_fast.memory.command): --json / --png, --measure, bad input."""
from __future__ import annotations

import json

import pytest

from rlhf_fast import cli, memory
from rlhf_fast.presets import available_presets
from tests.memory.test_micro_step import TINY

GiB = 2**30


def test_cli_json_schema(capsys):
    assert cli.main(_args() + ["--json", "--gpu-mem", "24GiB"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {"model", "setup", "gpu_mem_bytes", "layouts", "verdict"}
    assert rep["gpu_mem_bytes"] == 24 * GiB
    assert set(rep["layouts"]) == set(memory.LAYOUTS)
    for layout in rep["layouts"].values():
        assert set(layout["components"]) == set(memory.COMPONENTS)
        assert all(isinstance(v, int) and v >= 0 for v in layout["components"].values())
        assert layout["peak_bytes"] == layout["static_bytes"] + max(layout["train_bytes"], layout["generate_bytes"])
        assert isinstance(layout["fits"], bool)
        assert 0 < layout["activations_other_checkpointing"] < layout["components"]["activations"]  # ckpt on
    assert set(rep["verdict"]) == {"layout", "fits", "peak_bytes", "suggestions"}
    assert rep["layouts"]["shared"]["peak_bytes"] < rep["layouts"]["four-model"]["peak_bytes"]


def test_cli_table_and_png(tmp_path, capsys):
    png = tmp_path / "mem.png"
    assert cli.main(_args() + ["--png", str(png), "--gpu-mem", "8GB"]) == 0
    out = capsys.readouterr().out
    assert "four-model" in out and "shared" in out and "verdict:" in out and "kv cache" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _args(**replace) -> list[str]:
    args = {"--model": "qwen2.5-0.5b", "--batch": "4", "--prompt-len": "64", "--response-len": "128"}
    args.update(replace)
    return ["memory"] + [x for kv in args.items() for x in kv]


@pytest.mark.parametrize("argv,message", [
    (_args(**{"--batch": "0"}), "--batch must be a positive integer"),
    (_args(**{"--response-len": "-3"}), "--response-len must be a positive integer"),
    (_args(**{"--gpu-mem": "80 bananas"}), "cannot parse memory size"),
    (_args(**{"--model": "nope"}), "preset name (llama-3-70b, llama-3-8b, qwen2.5-0.5b, qwen2.5-7b"),
    (_args() + ["--fsdp"], "--fsdp needs --gpus >= 2"),
    (_args(**{"--device": "cpu", "--trace": "t.pickle"}) + ["--measure"], "needs CUDA"),
    (_args(**{"--trace": "t.pickle"}), "add --measure"),
])
def test_cli_bad_inputs(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("rlhf-fast memory: error:")


def test_presets_listed():
    assert {"qwen2.5-0.5b", "qwen2.5-7b", "llama-3-8b", "llama-3-70b"} <= set(available_presets())


def test_cli_measure_prints_measured_beside_predicted(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY["qwen2-untied"]))
    argv = ["memory", "--model", str(tmp_path), "--batch", "2", "--prompt-len", "8", "--response-len", "8",
            "--dtype", "fp32", "--measure", "--device", "cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "measured on cpu" in out and "predicted" in out and "logprob_buffer" in out
    assert cli.main(argv + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["measured"]
    assert rep["measured"]["params"] == rep["predicted"]["params"]


def test_cli_measure_refuses_what_cannot_fit_here(capsys):
    argv = ["memory", "--model", "llama-3-70b", "--batch", "1", "--prompt-len", "8", "--response-len", "8",
            "--measure", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "--measure builds real weights" in capsys.readouterr().err


def test_cli_fused_backbone_lowers_the_shared_layouts_activations_only(capsys):
    assert cli.main(_args() + ["--json", "--no-fused-backbone"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main(_args() + ["--json"]) == 0  # the fused backbone is the trainers' default, and the planner's
    fused = json.loads(capsys.readouterr().out)
    assert fused["setup"]["fused_backbone"] and not plain["setup"]["fused_backbone"]
    act = {k: (plain["layouts"][k]["components"]["activations"], fused["layouts"][k]["components"]["activations"])
           for k in memory.LAYOUTS}
    assert act["shared"][1] < act["shared"][0] and act["four-model"][1] == act["four-model"][0]  # TRL's is HF's
    assert cli.main(_args() + ["--fused-backbone"]) == 0
    assert "fused backbone" in capsys.readouterr().out
