"""rlhf_fast.stages.data: loading + validation errors that name file and line, chat formatting, tokenizing, batching."""
from __future__ import annotations

import json

import pytest
import torch

from rlhf_fast.stages.data import (
    DatasetFormatError,
    SFTExample,
    collate_sft,
    length_grouped_batches,
    load_preference_rows,
    load_rows,
    load_sft_rows,
    pad_sequences,
    split_rows,
    tokenize_preference_rows,
    tokenize_sft_rows,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


SFT_ROWS = [{"prompt": f"question {i}", "response": f" answer {i}"} for i in range(5)]
PREF_ROWS = [{"prompt": "p", "chosen": " good", "rejected": " bad", "margin": 0.5}] * 3


@pytest.fixture(scope="module")
def tokenizer():
    from rlhf_fast.stages.demo_data import build_demo_tokenizer, demo_corpus

    return build_demo_tokenizer(demo_corpus().train[:100], vocab_size=320)


# --------------------------------------------------------------------------- loading
def test_jsonl_json_parquet_dataset_and_list_give_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = write_jsonl(tmp_path / "d.jsonl", SFT_ROWS)
    js = tmp_path / "d.json"
    js.write_text(json.dumps(SFT_ROWS))
    js_cols = tmp_path / "cols.json"
    js_cols.write_text(json.dumps({"prompt": [r["prompt"] for r in SFT_ROWS], "response": [r["response"] for r in SFT_ROWS]}))
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(SFT_ROWS), pqf)
    ds = datasets.Dataset.from_list(SFT_ROWS)
    for source in (jl, js, js_cols, pqf, ds, SFT_ROWS, str(jl)):
        assert load_sft_rows(source).rows == SFT_ROWS
    assert load_rows(jl).locations[2] == f"{jl} line 3"
    with pytest.raises(DatasetFormatError, match="DatasetDict"):
        load_rows(datasets.DatasetDict({"train": ds}))


def test_empty_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(SFT_ROWS[0]) + "\n\n" + json.dumps(SFT_ROWS[1]) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"{path} line 2: empty line"):
        load_sft_rows(path)


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(SFT_ROWS[0]) + '\n{"prompt": "x", "response": }\n')
    with pytest.raises(DatasetFormatError, match=rf"{path} line 2: invalid JSON .* column 29"):
        load_sft_rows(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(DatasetFormatError, match="line 1: expected a JSON object per line, got list"):
        load_sft_rows(path)


def test_non_utf8_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(SFT_ROWS[0]).encode() + b'\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DatasetFormatError, match=rf"{path} line 2: not UTF-8 text \(invalid byte at column 16\)"):
        load_sft_rows(path)
    js = tmp_path / "d.json"
    js.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "\xff"}]')
    with pytest.raises(DatasetFormatError, match=rf"{js} line 3: not UTF-8"):
        load_rows(js)


def test_wrong_columns_name_line_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SFT_ROWS[0], {"prompt": "x", "answer": "y"}])
    with pytest.raises(DatasetFormatError) as e:
        load_sft_rows(path)
    assert f"{path} line 2" in str(e.value) and "'response'" in str(e.value) and "['answer', 'prompt']" in str(e.value)
    path = write_jsonl(tmp_path / "p.jsonl", [PREF_ROWS[0], {"prompt": "p", "chosen": "c"}])
    with pytest.raises(DatasetFormatError, match=rf"{path} line 2: missing column 'rejected'"):
        load_preference_rows(path)
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": 3, "response": "y"}])
    with pytest.raises(DatasetFormatError, match="line 1: column 'prompt' must be a string or a list of messages, got int"):
        load_sft_rows(path)
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}])
    with pytest.raises(DatasetFormatError, match="line 1: column 'margin' must be a finite number"):
        load_preference_rows(path)
    with pytest.raises(DatasetFormatError, match="row 0: column 'response' is an empty string"):
        load_sft_rows([{"prompt": "p", "response": "  "}])


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetFormatError, match="unsupported extension '.csv'"):
        load_rows(tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DatasetFormatError, match="holds no rows"):
        load_rows(tmp_path / "e.jsonl")
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetFormatError, match="cannot read as Parquet"):
        load_rows(tmp_path / "x.parquet")
    with pytest.raises(TypeError, match="must be a path"):
        load_rows(42)


def test_messages_rows_normalised():
    rows = load_sft_rows([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                          {"prompt": "p", "completion": "c"}])
    assert rows.rows[0] == {"prompt": [{"role": "user", "content": "hi"}], "response": [{"role": "assistant", "content": "yo"}]}
    assert rows.rows[1] == {"prompt": "p", "response": "c"}
    with pytest.raises(DatasetFormatError, match="must end with an assistant message"):
        load_sft_rows([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DatasetFormatError, match=r"messages\[1\] must be a message"):
        load_sft_rows([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}])


def test_split_rows():
    rows = load_sft_rows([{"prompt": f"p{i}", "response": "r"} for i in range(20)])
    tr, ev = split_rows(rows, 0.25, seed=1)
    assert len(ev.rows) == 5 and len(tr.rows) == 15
    assert {r["prompt"] for r in tr.rows} | {r["prompt"] for r in ev.rows} == {f"p{i}" for i in range(20)}
    assert split_rows(rows, 0.25, seed=1)[1].rows == ev.rows


# --------------------------------------------------------------------------- tokenizing
def test_plain_tokenizing_appends_eos_and_keeps_boundaries(tokenizer):
    rows = load_sft_rows([{"prompt": "The function", "response": " returns a value"}])
    (ex,) = tokenize_sft_rows(rows, tokenizer)
    assert ex.prompt_ids == tokenizer("The function")["input_ids"]
    assert ex.response_ids == tokenizer(" returns a value")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ex.prompt_ids + ex.response_ids) == "The function returns a value<eos>"


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    prompt = " ".join(["alpha"] * 40)
    response = " " + " ".join(["omega"] * 40)
    (ex,) = tokenize_sft_rows(load_sft_rows([{"prompt": prompt, "response": response}]), tokenizer,
                              max_length=20, max_prompt_length=6)
    full_p = tokenizer(prompt)["input_ids"]
    full_r = tokenizer(response)["input_ids"]
    assert ex.prompt_ids == full_p[-6:] and ex.response_ids == full_r[:14]
    assert len(ex.prompt_ids) + len(ex.response_ids) == 20


def test_chat_template_rows(tokenizer):
    tok = tokenizer
    tok.chat_template = (
        "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<bos>assistant: {% endif %}"
    )
    try:
        rows = load_sft_rows([
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"prompt": "hello", "response": "there"},
        ])
        a, b = tokenize_sft_rows(rows, tok)
        assert tok.decode(a.prompt_ids) == "<bos>user: hi<eos><bos>assistant: "
        assert tok.decode(a.response_ids) == "yo<eos>"  # the template's own end, no extra EOS
        assert tok.decode(b.prompt_ids) == "<bos>user: hello<eos><bos>assistant: "  # plain prompt as a user turn
        (plain,) = tokenize_sft_rows(load_sft_rows([{"prompt": "hello", "response": "there"}]),
                                     tok, use_chat_template=False)
        assert tok.decode(plain.prompt_ids + plain.response_ids) == "hellothere<eos>"
        (pref,) = tokenize_preference_rows(load_preference_rows([
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"}]), tok)
        assert tok.decode(pref.chosen_ids) == "<bos>user: q<eos><bos>assistant: good<eos>"
        assert tok.decode(pref.rejected_ids) == "<bos>user: q<eos><bos>assistant: bad<eos>"
        assert pref.margin == 0.0
    finally:
        tok.chat_template = None
    with pytest.raises(DatasetFormatError, match="row 0: the row is chat-formatted .* no chat_template"):
        tokenize_sft_rows(load_sft_rows([{"messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]}]), tok)


def test_preference_tokenizing_margin(tokenizer):
    (ex,) = tokenize_preference_rows(load_preference_rows(PREF_ROWS[:1]), tokenizer)
    p = tokenizer("p")["input_ids"]
    assert ex.chosen_ids == p + tokenizer(" good")["input_ids"] + [1]
    assert ex.rejected_ids == p + tokenizer(" bad")["input_ids"] + [1]
    assert ex.margin == 0.5


# --------------------------------------------------------------------------- batching
def test_collate_sft_labels_hand_worked():
    batch = collate_sft([SFTExample([5, 6], [7, 8]), SFTExample([9], [10])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # position t is scored against token t+1 when t+1 is a response token
    assert batch["labels"].tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]
    assert batch["label_positions"].tolist() == [1, 2, 4]  # flat b * T + t, row-major
    assert batch["target_ids"].tolist() == [7, 8, 10]


def test_pad_sequences_left_and_right():
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_id=0, side="left", pad_to_multiple_of=4)
    assert ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_id=9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long


def test_length_grouped_batches_cover_everything_and_cut_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=gen).tolist()
    batches = length_grouped_batches(lengths, 8, shuffle=True, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    assert all(len(b) <= 8 for b in batches)
    assert batches == length_grouped_batches(lengths, 8, shuffle=True, seed=3)
    assert batches != length_grouped_batches(lengths, 8, shuffle=True, seed=4)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    naive = [list(range(i, min(i + 8, 1000))) for i in range(0, 1000, 8)]
    assert padding(batches) < 0.1 * padding(naive)
    ordered = length_grouped_batches(lengths, 8, shuffle=False)
    assert [lengths[b[0]] for b in ordered] == sorted((lengths[b[0]] for b in ordered), reverse=True)


def test_save_to_disk_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list(PREF_ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_preference_rows(tmp_path / "ds").rows == PREF_ROWS
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetFormatError, match="not a datasets.save_to_disk directory"):
        load_rows(tmp_path / "plain")
