"""The predictor (rlhf_fast.memory.spec / predictor / report): exact parameter bytes of published
architectures, meta-device builds, hand-worked formulas, verdict logic."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest

from rlhf_fast import memory


def _shape(spec: str) -> memory.ModelShape:
    return memory.model_shape(memory.build_meta_model(memory.load_model_config(spec)))


# --------------------------------------------------------------------------- presets and exact numbers
def test_llama3_8b_bf16_policy_parameter_bytes_are_exact():
    shape = _shape("llama-3-8b")
    assert shape.total_numel == 8_030_261_248
    setup = memory.Setup(batch=1, prompt_len=16, response_len=16, dtype="bf16")
    for layout in memory.LAYOUTS:
        assert memory.predict(shape, setup, layout).components["policy params"] == 16_060_522_496


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
    model = memory.build_meta_model(memory.load_model_config("llama-3-70b"))
    elapsed = time.perf_counter() - t0
    assert next(model.parameters()).is_meta
    assert memory.model_shape(model).total_numel == 70_553_706_496
    assert elapsed < 5.0, f"meta build of 70B took {elapsed:.1f} s"


def test_model_from_directory_and_config_file(tmp_path):
    src = memory.load_model_config("qwen2.5-0.5b").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(src))
    by_dir, by_file = _shape(str(tmp_path)), _shape(str(tmp_path / "config.json"))
    assert by_dir == by_file == _shape("qwen2.5-0.5b")


def test_bad_model_specs_list_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="qwen2.5-0.5b.*llama-3-8b|llama-3-8b.*qwen2.5-0.5b"):
        memory.load_model_config("gpt-17")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read.*preset name"):
        memory.load_model_config(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        memory.load_model_config(str(empty))


# --------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("text,expected", [
    ("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("80G", 80 * 2**30), ("81920MiB", 80 * 2**30),
    ("24 gb", 24 * 10**9), ("1.5TiB", int(1.5 * 2**40)), ("1024", 1024),
])
def test_parse_memory(text, expected):
    assert memory.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80XB", "GB", "-5GB", "0GB", "eighty", ""])
def test_parse_memory_rejects_with_accepted_forms(text):
    with pytest.raises(ValueError, match="80GiB.*81920MiB"):
        memory.parse_memory(text)


def test_hand_worked_components_llama3_8b():
    s = _shape("llama-3-8b")
    B, P, R = 4, 256, 768
    setup = memory.Setup(batch=B, prompt_len=P, response_len=R, dtype="bf16", precision="mixed")
    c = memory.predict(s, setup, "shared").components
    n = 8_030_261_248
    assert c["policy grads"] == 2 * n and c["policy optimizer"] == 12 * n  # fp32 master + m + v
    assert c["reference"] == 2 * n
    assert c["kv cache"] == 2 * 32 * 8 * 128 * (P + R) * B * 2
    # fused: one fp32 [chunk, V] buffer (CUDA budget 2^26 elements -> 512 rows at V=128256) + fp32 head grad
    assert c["logprob buffers"] == 512 * 128256 * 4 + 128256 * 4096 * 4
    four = memory.predict(s, setup, "four-model").components
    assert four["logprob buffers"] == 2 * B * (P + R) * 128256 * 4
    assert four["value params"] == (n - 128256 * 4096 + 4096) * 2
    assert four["activations"] == 2 * c["activations"]
    pure = memory.predict(s, dataclasses.replace(setup, precision="pure"), "shared").components
    amp = memory.predict(s, dataclasses.replace(setup, precision="amp"), "shared").components
    assert pure["policy optimizer"] == 4 * n and amp["policy params"] == 4 * n and amp["policy optimizer"] == 8 * n


def test_checkpointing_lora_and_fsdp_reduce_what_they_should():
    s = _shape("llama-3-8b")
    base = memory.Setup(batch=8, prompt_len=512, response_len=512)
    p0 = memory.predict(s, base)
    ck = memory.predict(s, dataclasses.replace(base, grad_checkpointing=True))
    assert ck.components["activations"] < p0.components["activations"] / 5
    lora = memory.predict(s, dataclasses.replace(base, reference="lora", lora_r=16))
    # Llama linears per layer: q, k, v, o, gate, up, down
    per_layer = (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096)
    assert lora.components["policy grads"] == 16 * 32 * per_layer * 2
    assert lora.components["reference"] == 0
    fs_rep = memory.predict(s, dataclasses.replace(base, gpus=8, fsdp=True, shard_frozen=False))
    for k in memory.STATIC:  # --replicate-frozen: a full reference and reward on every GPU
        assert fs_rep.components[k] == (p0.components[k] if k in ("reference", "reward") else -(-p0.components[k] // 8))
    fs = fs_all = memory.predict(s, dataclasses.replace(base, gpus=8, fsdp=True))  # the trainer's default
    four0 = memory.predict(s, base, "four-model")
    four8 = memory.predict(s, dataclasses.replace(base, gpus=8, fsdp=True), "four-model")
    for k in memory.STATIC:
        assert fs_all.components[k] == -(-p0.components[k] // 8)
        assert four8.components[k] == -(-four0.components[k] // 8)
    for k in memory.TRAIN + memory.GENERATE:
        assert fs.components[k] == p0.components[k]
    ddp = memory.predict(s, dataclasses.replace(base, gpus=8))
    assert ddp.peak_bytes == p0.peak_bytes


# --------------------------------------------------------------------------- verdict
def _fits(shape, setup, gpu_mem):
    return memory.predict(shape, setup).peak_bytes <= gpu_mem


def test_verdict_suggestions_actually_fit():
    s = _shape("llama-3-8b")
    setup = memory.Setup(batch=8, prompt_len=512, response_len=512, grad_checkpointing=True)
    mem = memory.parse_memory("80GB")
    rep = memory.report_dict("llama-3-8b", s, setup, mem)
    assert rep["verdict"]["fits"] is False
    sugg = rep["verdict"]["suggestions"]
    assert sugg and any("--fsdp across" in x["text"] for x in sugg)
    for x in sugg:
        fixed = dataclasses.replace(setup, **x["changes"])
        assert _fits(s, fixed, mem), x
        assert memory.predict(s, fixed).peak_bytes == x["peak_bytes"]
    fsdp = next(x for x in sugg if "--fsdp" in x["text"])
    n = fsdp["changes"]["gpus"]
    assert not _fits(s, dataclasses.replace(setup, gpus=n // 2, fsdp=n // 2 > 1), mem)  # the fewest GPUs


def test_lower_batch_suggestion_is_the_largest_that_fits():
    s = _shape("qwen2.5-0.5b")
    setup = memory.Setup(batch=64, prompt_len=512, response_len=1024)
    mem = memory.parse_memory("24GB")
    assert not _fits(s, setup, mem)
    sugg = memory.suggestions(s, setup, mem)
    assert any(x.changes == {"grad_checkpointing": True} for x in sugg)
    batch = next(x for x in sugg if "batch" in x.changes).changes["batch"]
    assert 1 <= batch < 64
    assert _fits(s, dataclasses.replace(setup, batch=batch), mem)
    assert not _fits(s, dataclasses.replace(setup, batch=batch + 1), mem)


def test_fitting_setup_has_no_suggestions_and_combination_when_needed():
    s = _shape("qwen2.5-0.5b")
    small = memory.Setup(batch=2, prompt_len=128, response_len=128)
    rep = memory.report_dict("q", s, small, memory.parse_memory("80GB"))
    assert rep["verdict"]["fits"] and rep["verdict"]["suggestions"] == []
    # 70B on one 80 GB GPU: nothing single fits but FSDP; every suggestion re-evaluates as fitting
    big = _shape("llama-3-70b")
    setup = memory.Setup(batch=1, prompt_len=512, response_len=512)
    mem = memory.parse_memory("80GB")
    sugg = memory.suggestions(big, setup, mem)
    assert sugg
    for x in sugg:
        assert _fits(big, dataclasses.replace(setup, **x.changes), mem)


def test_packed_tokens_count_real_tokens_in_our_layout_only():
    shape = memory.model_shape(memory.build_meta_model(memory.load_model_config("qwen2.5-0.5b")))
    padded = memory.Setup(batch=8, prompt_len=256, response_len=256, fused_backbone=True)
    packed = dataclasses.replace(padded, packed_tokens=2048)  # half of the 8 x 512 padded tokens are real
    ours, ours_packed = memory.predict(shape, padded, "shared"), memory.predict(shape, packed, "shared")
    assert ours_packed.components["activations"] == pytest.approx(ours.components["activations"] / 2, rel=1e-6)
    trl, trl_packed = memory.predict(shape, padded, "four-model"), memory.predict(shape, packed, "four-model")
    assert trl_packed.components["activations"] == trl.components["activations"]  # TRL always pads
    more = dataclasses.replace(padded, packed_tokens=10**6)
    assert memory.predict(shape, more, "shared").components["activations"] == ours.components["activations"]


def test_setup_from_ppo_config_reads_the_token_budget():
    from rlhf_fast.trainer import PPOConfig

    mem = {"model": "qwen2.5-0.5b", "prompt_len": 128, "gpus": 1, "gpu_mem": "80GB"}
    cfg = PPOConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, micro_batch_token_budget=1024)
    assert memory.setup_from_ppo_config(cfg, mem)[1].packed_tokens == 1024
    cfg = PPOConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, micro_batch_token_budget=1024, padding_free=False)
    assert memory.setup_from_ppo_config(cfg, mem)[1].packed_tokens is None
