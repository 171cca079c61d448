"""`rlhf-fast memory`: exact parameter bytes of published architectures, meta-device builds, prediction
against real allocations (AllocationTracker), verdict logic, --json / --png, bad input."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest

from rlhf_fast import cli, profiler
from rlhf_fast.presets import available_presets

GiB = 2**30


def _shape(spec: str) -> profiler.ModelShape:
    return profiler.model_shape(profiler.build_meta_model(profiler.load_model_config(spec)))


# --------------------------------------------------------------------------- presets and exact numbers
def test_llama3_8b_bf16_policy_parameter_bytes_are_exact():
    shape = _shape("llama-3-8b")
    assert shape.total_numel == 8_030_261_248
    setup = profiler.Setup(batch=1, prompt_len=16, response_len=16, dtype="bf16")
    for layout in profiler.LAYOUTS:
        assert profiler.predict(shape, setup, layout).components["policy params"] == 16_060_522_496


@pytest.mark.parametrize("name,numel,tied,vocab", [
    ("qwen2.5-0.5b", 494_032_768, True, 151936),
    ("Qwen2.5-7B", 7_615_616_512, False, 152064),
    ("LLAMA3-8B", 8_030_261_248, False, 128256),
])
def test_presets_have_the_published_sizes_and_are_found_case_insensitively(name, numel, tied, vocab):
    shape = _shape(name)
    assert (shape.total_numel, shape.tied, shape.vocab) == (numel, tied, vocab)
    untied_head = 0 if tied else shape.vocab * shape.hidden
    assert shape.backbone_numel == numel - untied_head


def test_70b_preset_builds_on_meta_in_seconds():
    t0 = time.perf_counter()
    model = profiler.build_meta_model(profiler.load_model_config("llama-3-70b"))
    elapsed = time.perf_counter() - t0
    assert next(model.parameters()).is_meta
    assert profiler.model_shape(model).total_numel == 70_553_706_496
    assert elapsed < 5.0, f"meta build of 70B took {elapsed:.1f} s"


def test_model_from_directory_and_config_file(tmp_path):
    src = profiler.load_model_config("qwen2.5-0.5b").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(src))
    by_dir, by_file = _shape(str(tmp_path)), _shape(str(tmp_path / "config.json"))
    assert by_dir == by_file == _shape("qwen2.5-0.5b")


def test_bad_model_specs_list_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="qwen2.5-0.5b.*llama-3-8b|llama-3-8b.*qwen2.5-0.5b"):
        profiler.load_model_config("gpt-17")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read.*preset name"):
        profiler.load_model_config(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        profiler.load_model_config(str(empty))


# --------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("text,expected", [
    ("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("80G", 80 * 2**30), ("81920MiB", 80 * 2**30),
    ("24 gb", 24 * 10**9), ("1.5TiB", int(1.5 * 2**40)), ("1024", 1024),
])
def test_parse_memory(text, expected):
    assert profiler.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80XB", "GB", "-5GB", "0GB", "eighty", ""])
def test_parse_memory_rejects_with_accepted_forms(text):
    with pytest.raises(ValueError, match="80GiB.*81920MiB"):
        profiler.parse_memory(text)


def test_hand_worked_components_llama3_8b():
    s = _shape("llama-3-8b")
    B, P, R = 4, 256, 768
    setup = profiler.Setup(batch=B, prompt_len=P, response_len=R, dtype="bf16", precision="mixed")
    c = profiler.predict(s, setup, "shared").components
    n = 8_030_261_248
    assert c["policy grads"] == 2 * n and c["policy optimizer"] == 12 * n  # fp32 master + m + v
    assert c["reference"] == 2 * n
    assert c["kv cache"] == 2 * 32 * 8 * 128 * (P + R) * B * 2
    # fused: one fp32 [chunk, V] buffer (CUDA budget 2^26 elements -> 512 rows at V=128256) + fp32 head grad
    assert c["logprob buffers"] == 512 * 128256 * 4 + 128256 * 4096 * 4
    four = profiler.predict(s, setup, "four-model").components
    assert four["logprob buffers"] == 2 * B * (P + R) * 128256 * 4
    assert four["value params"] == (n - 128256 * 4096 + 4096) * 2
    assert four["activations"] == 2 * c["activations"]
    pure = profiler.predict(s, dataclasses.replace(setup, precision="pure"), "shared").components
    amp = profiler.predict(s, dataclasses.replace(setup, precision="amp"), "shared").components
    assert pure["policy optimizer"] == 4 * n and amp["policy params"] == 4 * n and amp["policy optimizer"] == 8 * n


def test_checkpointing_lora_and_fsdp_reduce_what_they_should():
    s = _shape("llama-3-8b")
    base = profiler.Setup(batch=8, prompt_len=512, response_len=512)
    p0 = profiler.predict(s, base)
    ck = profiler.predict(s, dataclasses.replace(base, grad_checkpointing=True))
    assert ck.components["activations"] < p0.components["activations"] / 5
    lora = profiler.predict(s, dataclasses.replace(base, reference="lora", lora_r=16))
    # Llama linears per layer: q, k, v, o, gate, up, down
    per_layer = (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096)
    assert lora.components["policy grads"] == 16 * 32 * per_layer * 2
    assert lora.components["reference"] == 0
    fs_rep = profiler.predict(s, dataclasses.replace(base, gpus=8, fsdp=True, shard_frozen=False))
    for k in profiler.STATIC:  # --replicate-frozen: a full reference and reward on every GPU
        assert fs_rep.components[k] == (p0.components[k] if k in ("reference", "reward") else -(-p0.components[k] // 8))
    fs = fs_all = profiler.predict(s, dataclasses.replace(base, gpus=8, fsdp=True))  # the trainer's default
    four0 = profiler.predict(s, base, "four-model")
    four8 = profiler.predict(s, dataclasses.replace(base, gpus=8, fsdp=True), "four-model")
    for k in profiler.STATIC:
        assert fs_all.components[k] == -(-p0.components[k] // 8)
        assert four8.components[k] == -(-four0.components[k] // 8)
    for k in profiler.TRAIN + profiler.GENERATE:
        assert fs.components[k] == p0.components[k]
    ddp = profiler.predict(s, dataclasses.replace(base, gpus=8))
    assert ddp.peak_bytes == p0.peak_bytes


# --------------------------------------------------------------------------- predicted vs measured
TINY = {
    "qwen2-untied": dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
                         max_position_embeddings=256),
    "llama-tied": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True,
                       max_position_embeddings=256),
}


@pytest.mark.parametrize("name,reference,dtype,ckpt", [
    ("qwen2-untied", "frozen", "fp32", False),
    ("llama-tied", "lora", "fp32", False),
    ("qwen2-untied", "none", "bf16", False),
    ("llama-tied", "frozen", "bf16", True),
])
def test_prediction_matches_allocation_tracker_on_a_real_micro_step(tmp_path, name, reference, dtype, ckpt):
    """params = policy + value head + reference weights as allocated; grads = the .grad tensors backward
    allocated; optimizer = AdamW state allocated by step(); logprob_buffer = the largest fp32 [rows, V]
    tensor of the step (the fused op's chunk buffer); activations (no checkpointing) = the distinct
    storages autograd saved in the policy forward. Same tensors on both sides, within 15%."""
    (tmp_path / "config.json").write_text(json.dumps(TINY[name]))
    config = profiler.load_model_config(str(tmp_path / "config.json"))
    shape = profiler.model_shape(profiler.build_meta_model(config))
    setup = profiler.Setup(batch=3, prompt_len=8, response_len=16, reference=reference, dtype=dtype,
                           grad_checkpointing=ckpt)
    measured = profiler.measure_micro_step(config, setup, device="cpu")
    predicted = profiler.compare_measured(shape, setup, measured)
    if ckpt:  # forward keeps layer inputs only: far below the full activations (looser: small extras count)
        full = profiler.compare_measured(shape, dataclasses.replace(setup, grad_checkpointing=False), measured)
        assert measured["activations"] < 0.5 * full["activations"]
        assert abs(measured["activations"] - predicted["activations"]) <= 0.5 * predicted["activations"]
    keys = ("params", "grads", "optimizer", "logprob_buffer") + (() if ckpt else ("activations",))
    for key in keys:
        assert measured[key] > 0, key
        assert abs(measured[key] - predicted[key]) <= 0.15 * predicted[key], (key, measured[key], predicted[key])
    if reference == "lora":
        assert predicted["grads"] < predicted["params"] / 4  # only adapters + value head train


def test_trace_needs_cuda():
    setup = profiler.Setup(batch=1, prompt_len=4, response_len=4, dtype="fp32")
    with pytest.raises(ValueError, match="needs CUDA"):
        profiler.measure_micro_step(profiler.load_model_config("qwen2.5-0.5b"), setup, device="cpu",
                                    trace="x.pickle")


# --------------------------------------------------------------------------- verdict
def _fits(shape, setup, gpu_mem):
    return profiler.predict(shape, setup).peak_bytes <= gpu_mem


def test_verdict_suggestions_actually_fit():
    s = _shape("llama-3-8b")
    setup = profiler.Setup(batch=8, prompt_len=512, response_len=512, grad_checkpointing=True)
    mem = profiler.parse_memory("80GB")
    rep = profiler.report_dict("llama-3-8b", s, setup, mem)
    assert rep["verdict"]["fits"] is False
    sugg = rep["verdict"]["suggestions"]
    assert sugg and any("--fsdp across" in x["text"] for x in sugg)
    for x in sugg:
        fixed = dataclasses.replace(setup, **x["changes"])
        assert _fits(s, fixed, mem), x
        assert profiler.predict(s, fixed).peak_bytes == x["peak_bytes"]
    fsdp = next(x for x in sugg if "--fsdp" in x["text"])
    n = fsdp["changes"]["gpus"]
    assert not _fits(s, dataclasses.replace(setup, gpus=n // 2, fsdp=n // 2 > 1), mem)  # the fewest GPUs


def test_lower_batch_suggestion_is_the_largest_that_fits():
    s = _shape("qwen2.5-0.5b")
    setup = profiler.Setup(batch=64, prompt_len=512, response_len=1024)
    mem = profiler.parse_memory("24GB")
    assert not _fits(s, setup, mem)
    sugg = profiler.suggestions(s, setup, mem)
    assert any(x.changes == {"grad_checkpointing": True} for x in sugg)
    batch = next(x for x in sugg if "batch" in x.changes).changes["batch"]
    assert 1 <= batch < 64
    assert _fits(s, dataclasses.replace(setup, batch=batch), mem)
    assert not _fits(s, dataclasses.replace(setup, batch=batch + 1), mem)


def test_fitting_setup_has_no_suggestions_and_combination_when_needed():
    s = _shape("qwen2.5-0.5b")
    small = profiler.Setup(batch=2, prompt_len=128, response_len=128)
    rep = profiler.report_dict("q", s, small, profiler.parse_memory("80GB"))
    assert rep["verdict"]["fits"] and rep["verdict"]["suggestions"] == []
    # 70B on one 80 GB GPU: nothing single fits but FSDP; every suggestion re-evaluates as fitting
    big = _shape("llama-3-70b")
    setup = profiler.Setup(batch=1, prompt_len=512, response_len=512)
    mem = profiler.parse_memory("80GB")
    sugg = profiler.suggestions(big, setup, mem)
    assert sugg
    for x in sugg:
        assert _fits(big, dataclasses.replace(setup, **x.changes), mem)


# --------------------------------------------------------------------------- CLI


def test_cli_json_schema(capsys):
    assert cli.main(_args() + ["--json", "--gpu-mem", "24GiB"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {"model", "setup", "gpu_mem_bytes", "layouts", "verdict"}
    assert rep["gpu_mem_bytes"] == 24 * GiB
    assert set(rep["layouts"]) == set(profiler.LAYOUTS)
    for layout in rep["layouts"].values():
        assert set(layout["components"]) == set(profiler.COMPONENTS)
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
