"""Loading from local directories and in-memory models; architecture, LM-head and tokenizer checks."""
from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import PolicyValueModel, ensure_pad_token, load_causal_lm, resolve_attn_implementation
from tests.models.conftest import tiny_causal_lm, tiny_config, tiny_seq_cls, word_tokenizer
from tests.models.test_policy_value import ATOL


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_load_from_local_directory_matches_in_memory(arch, tmp_path, batch):
    model = tiny_causal_lm(arch)
    model.save_pretrained(tmp_path / "m")
    from_dir = PolicyValueModel(str(tmp_path / "m"), reference="none")
    in_mem = PolicyValueModel(model, reference="none")
    a = from_dir(batch.input_ids, batch.attention_mask, response_start=batch.P, return_values=False).logprobs
    b = in_mem(batch.input_ids, batch.attention_mask, response_start=batch.P, return_values=False).logprobs
    torch.testing.assert_close(a, b, **ATOL)
    assert from_dir.policy.config._attn_implementation == "sdpa"


def test_save_pretrained_round_trip_keeps_policy_and_value_head(tmp_path, batch):
    pv = PolicyValueModel(tiny_causal_lm("llama"), reference="none", tokenizer=word_tokenizer(with_pad=True))
    with torch.no_grad():
        pv.value_head.weight.normal_()
    pv.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "value_head.pt").is_file() and (tmp_path / "ckpt" / "tokenizer.json").is_file()
    back = PolicyValueModel.from_pretrained(tmp_path / "ckpt", reference="none")
    x = back(batch.input_ids, batch.attention_mask, response_start=batch.P)
    y = pv(batch.input_ids, batch.attention_mask, response_start=batch.P)
    torch.testing.assert_close(x.logprobs, y.logprobs, **ATOL)
    torch.testing.assert_close(x.values, y.values, **ATOL)


def test_lora_save_pretrained_writes_adapters_only(tmp_path):
    pv = PolicyValueModel(tiny_causal_lm("qwen2"), reference="lora")
    pv.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert not (tmp_path / "lora" / "model.safetensors").exists()


def test_missing_directory_and_wrong_types():
    from pathlib import Path

    with pytest.raises(ValueError, match="does not exist"):
        load_causal_lm(Path("/nonexistent/model/dir"))
    with pytest.raises(TypeError, match="causal LM"):
        load_causal_lm(123)


def test_model_without_lm_head_names_the_fix():
    from transformers import AutoModel

    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        PolicyValueModel(AutoModel.from_config(tiny_config("qwen2")), reference="none")


def test_sequence_classifier_as_policy_is_rejected():
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        PolicyValueModel(tiny_seq_cls("qwen2"), reference="none")


def test_encoder_decoder_is_rejected():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match="encoder-decoder"):
        PolicyValueModel(t5, reference="none")


def test_masked_lm_is_rejected():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(ValueError, match="not a causal LM"):
        PolicyValueModel(bert, reference="none")


def test_tokenizer_without_pad_gets_eos_with_warning():
    tok = word_tokenizer(with_pad=False)
    assert tok.pad_token is None
    with pytest.warns(UserWarning, match="using the EOS token"):
        PolicyValueModel(tiny_causal_lm("qwen2"), reference="none", tokenizer=tok)
    assert tok.pad_token == "</s>" and tok.pad_token_id == 2
    ensure_pad_token(tok)  # already set: silent, unchanged


def test_tokenizer_without_pad_or_eos_raises():
    tok = word_tokenizer(with_pad=False)
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        ensure_pad_token(tok)


def test_attn_implementation_resolution():
    assert resolve_attn_implementation(None, "cpu") == "sdpa"
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="flash-attn"):
            resolve_attn_implementation("flash_attention_2")
    pv = PolicyValueModel(tiny_causal_lm("llama"), reference="none", attn_implementation="eager")
    assert pv.policy.config._attn_implementation == "eager"


def test_bad_mode_names():
    with pytest.raises(ValueError, match="reference must be one of"):
        PolicyValueModel(tiny_causal_lm("qwen2"), reference="copy")
    with pytest.raises(ValueError, match="critic must be one of"):
        PolicyValueModel(tiny_causal_lm("qwen2"), critic="twin")
    with pytest.raises(ValueError, match="critic='separate'"):
        PolicyValueModel(tiny_causal_lm("qwen2"), critic_model=tiny_seq_cls("qwen2"))
