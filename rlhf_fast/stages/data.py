"""Datasets for the stages (SFT, reward model, DPO, PPO prompts): loading, validation, chat formatting, tokenizing, batching.

Sources: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory written by
``datasets.Dataset.save_to_disk``, a ``datasets.Dataset``, or an in-memory list of dicts.

Row formats
- SFT: ``{"prompt": str, "response": str}`` (``"completion"`` is accepted for ``"response"``), or
  ``{"messages": [{"role", "content"}, ...]}`` whose last message is the assistant's response, or
  ``{"prompt": [messages], "completion": [messages]}`` (TRL's conversational form).
- Preferences: ``{"prompt", "chosen", "rejected"}`` (strings, or message lists), optional ``"margin"`` (number).

Chat formatting: message lists go through the tokenizer's chat template (required then); plain
string prompts go through it too when the tokenizer has one and ``use_chat_template`` is on, as a
single user turn. Without a template the text is used as is and the EOS token ends each response.
The loss / score positions are exact: prompt and response are tokenized separately and concatenated.

Every error names the source and the row (``file.jsonl line 7``) and what is wrong.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "DatasetFormatError", "Rows", "load_rows", "load_sft_rows", "load_preference_rows", "SFTExample",
    "PreferenceExample", "tokenize_sft_rows", "tokenize_preference_rows", "length_grouped_batches",
    "pad_sequences", "collate_sft", "split_rows",
]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")


class DatasetFormatError(ValueError):
    """A dataset file or row is malformed; the message names the file, line/row and the problem."""


class Rows(NamedTuple):
    """rows: list of dicts; locations[i]: where row i came from (``"data.jsonl line 3"``); source: a name."""

    rows: list[dict]
    locations: list[str]
    source: str


# --------------------------------------------------------------------------- loading
def _read_jsonl(path: Path) -> Rows:
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ending the last line
    rows, locs = [], []
    for i, raw in enumerate(lines, start=1):
        where = f"{path} line {i}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetFormatError(f"{where}: not UTF-8 text (invalid byte at column {e.start + 1})") from None
        if not text.strip():
            raise DatasetFormatError(f"{where}: empty line; every line of a .jsonl file must hold one JSON object")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
        rows.append(obj)
        locs.append(where)
    return Rows(rows, locs, str(path))


def _read_json(path: Path) -> Rows:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DatasetFormatError(f"{path} line {line}: not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        lengths = {k: len(v) for k, v in obj.items()}
        if len(set(lengths.values())) != 1:
            raise DatasetFormatError(f"{path}: column lists have different lengths {lengths}")
        n = next(iter(lengths.values()))
        obj = [{k: obj[k][i] for k in obj} for i in range(n)]
    if not isinstance(obj, list):
        raise DatasetFormatError(
            f"{path}: expected a JSON list of row objects (or an object of equal-length column lists), "
            f"got {type(obj).__name__}"
        )
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise DatasetFormatError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
    return Rows(obj, [f"{path} row {i}" for i in range(len(obj))], str(path))


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DatasetFormatError(f"{path}: cannot read as Parquet ({e})") from None
    rows = table.to_pylist()
    return Rows(rows, [f"{path} row {i}" for i in range(len(rows))], str(path))


def load_rows(source: Any, name: str = "dataset") -> Rows:
    """Rows from a file path, a ``save_to_disk`` directory, a ``datasets.Dataset`` or a list of dicts."""
    if isinstance(source, Rows):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DatasetFormatError(f"{name} file {str(path)!r} does not exist")
        if path.is_dir():
            if not ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
                raise DatasetFormatError(
                    f"{name} {str(path)!r} is a directory but not a datasets.save_to_disk directory; "
                    f"pass a {', '.join(SUPPORTED_SUFFIXES)} file"
                )
            import datasets

            return load_rows(datasets.load_from_disk(str(path)), name=str(path))
        suffix = path.suffix.lower()
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}.get(suffix)
        if reader is None:
            raise DatasetFormatError(
                f"{name} file {str(path)!r}: unsupported extension {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        rows = reader(path)
        if not rows.rows:
            raise DatasetFormatError(f"{name} file {str(path)!r} holds no rows")
        return rows
    if isinstance(source, list):
        for i, row in enumerate(source):
            if not isinstance(row, dict):
                raise DatasetFormatError(f"{name} row {i}: expected a dict, got {type(row).__name__}")
        return Rows(list(source), [f"{name} row {i}" for i in range(len(source))], name)
    try:
        import datasets

        if isinstance(source, datasets.DatasetDict):
            raise DatasetFormatError(
                f"{name} is a DatasetDict with splits {list(source)}; pass one split, e.g. dataset['train']"
            )
        if isinstance(source, datasets.Dataset):
            rows = source.to_list()
            return Rows(rows, [f"{name} row {i}" for i in range(len(rows))], name)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(
        f"{name} must be a path to a {'/'.join(SUPPORTED_SUFFIXES)} file, a datasets.Dataset or a list of dicts, "
        f"got {type(source).__name__}"
    )


# --------------------------------------------------------------------------- validation
def _check_messages(value: Any, where: str, column: str) -> None:
    if not isinstance(value, list) or not value:
        raise DatasetFormatError(f"{where}: column {column!r} must be a non-empty list of messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetFormatError(
                f"{where}: {column}[{j}] must be a message {{'role': str, 'content': str}}, got {m!r:.80}"
            )


def _check_text_or_messages(row: dict, column: str, where: str) -> None:
    if column not in row:
        raise DatasetFormatError(f"{where}: missing column {column!r} (columns present: {sorted(row)})")
    value = row[column]
    if isinstance(value, str):
        if not value.strip():
            raise DatasetFormatError(f"{where}: column {column!r} is an empty string")
        return
    if isinstance(value, list):
        _check_messages(value, where, column)
        return
    raise DatasetFormatError(
        f"{where}: column {column!r} must be a string or a list of messages, got {type(value).__name__}"
    )


def load_sft_rows(source: Any, name: str = "dataset") -> Rows:
    """Load and validate SFT rows, normalised to ``{"prompt": str | messages, "response": str | messages}``."""
    loaded = load_rows(source, name)
    out = []
    for row, where in zip(loaded.rows, loaded.locations):
        if "messages" in row and "prompt" not in row:
            _check_messages(row["messages"], where, "messages")
            msgs = row["messages"]
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise DatasetFormatError(
                    f"{where}: 'messages' must end with an assistant message after at least one other message"
                )
            out.append({"prompt": msgs[:-1], "response": [msgs[-1]]})
            continue
        response_key = "response" if "response" in row else "completion" if "completion" in row else None
        if response_key is None or "prompt" not in row:
            raise DatasetFormatError(
                f"{where}: an SFT row needs columns 'prompt' and 'response' (or 'completion'), or 'messages'; "
                f"columns present: {sorted(row)}"
            )
        _check_text_or_messages(row, "prompt", where)
        _check_text_or_messages(row, response_key, where)
        out.append({"prompt": row["prompt"], "response": row[response_key]})
    return Rows(out, loaded.locations, loaded.source)


def load_preference_rows(source: Any, name: str = "dataset") -> Rows:
    """Load and validate preference rows ``{"prompt", "chosen", "rejected"[, "margin"]}``."""
    loaded = load_rows(source, name)
    out = []
    for row, where in zip(loaded.rows, loaded.locations):
        for column in ("prompt", "chosen", "rejected"):
            _check_text_or_messages(row, column, where)
        clean = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        if row.get("margin") is not None:
            margin = row["margin"]
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
                raise DatasetFormatError(f"{where}: column 'margin' must be a finite number, got {margin!r}")
            clean["margin"] = float(margin)
        out.append(clean)
    return Rows(out, loaded.locations, loaded.source)


def split_rows(rows: Rows, eval_fraction: float, seed: int = 0) -> tuple[Rows, Rows]:
    """Random train / eval split (deterministic in ``seed``); eval gets at least one row when fraction > 0."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(rows.rows)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction == 0 else max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training rows out of {n}")
    ev, tr = sorted(order[:n_eval]), sorted(order[n_eval:])
    pick = lambda idx: Rows([rows.rows[i] for i in idx], [rows.locations[i] for i in idx], rows.source)
    return pick(tr), pick(ev)


# --------------------------------------------------------------------------- chat formatting + tokenizing
def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _format_pair(tokenizer, prompt, response, use_chat_template: bool, where: str) -> tuple[str, str, bool]:
    """(prompt text, response text, templated?) with prompt + response == the full formatted conversation."""
    templated = isinstance(prompt, list) or isinstance(response, list) or (use_chat_template and _has_chat_template(tokenizer))
    if not templated:
        return prompt, response, False
    if not _has_chat_template(tokenizer):
        raise DatasetFormatError(
            f"{where}: the row is chat-formatted (a list of messages) but the tokenizer has no chat_template; "
            f"use plain 'prompt'/'response' strings or a tokenizer with a chat template"
        )
    prompt_msgs = _as_messages(prompt, "user")
    response_msgs = _as_messages(response, "assistant")
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt_msgs + response_msgs, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DatasetFormatError(
            f"{where}: the chat template does not render the prompt as a prefix of the conversation, so the "
            f"response tokens cannot be located; use plain strings (use_chat_template=false)"
        )
    return prompt_text, full_text[len(prompt_text):], True


class SFTExample(NamedTuple):
    """Token ids of one SFT row: the loss covers ``response_ids`` only."""

    prompt_ids: list[int]
    response_ids: list[int]


class PreferenceExample(NamedTuple):
    """Token ids of prompt+chosen and prompt+rejected, and the row's margin (0.0 when absent)."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float


def _tokenize_pairs(tokenizer, prompts: list[str], responses: list[str], templated: list[bool],
                    max_length: int, max_prompt_length: int | None) -> list[SFTExample]:
    # Batched calls (Rust, parallel). A templated prompt already holds its special tokens; a plain one
    # gets whatever the tokenizer adds (e.g. BOS).
    plain_idx = [i for i, t in enumerate(templated) if not t]
    tmpl_idx = [i for i, t in enumerate(templated) if t]
    prompt_ids: list = [None] * len(prompts)
    for idx, add_special in ((plain_idx, True), (tmpl_idx, False)):
        if idx:
            for i, ids in zip(idx, tokenizer([prompts[i] for i in idx], add_special_tokens=add_special)["input_ids"]):
                prompt_ids[i] = ids
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    eos = tokenizer.eos_token_id
    max_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    out = []
    for i in range(len(prompts)):
        p = list(prompt_ids[i])
        r = list(r_ids[i])
        if not templated[i] and eos is not None and (not r or r[-1] != eos):
            r.append(eos)
        if len(p) + len(r) > max_length:
            keep = min(len(p), max(max_prompt, 0), max_length - 1)
            p = p[len(p) - keep:]  # keep the prompt's end, nearest the response
            r = r[: max_length - len(p)]
        out.append(SFTExample(p, r))
    return out


def tokenize_sft_rows(rows: Rows, tokenizer, max_length: int = 512, max_prompt_length: int | None = None,
                      use_chat_template: bool = True) -> list[SFTExample]:
    """Tokenize validated SFT rows. Too-long rows keep the prompt's last tokens (at most
    ``max_prompt_length``, default max_length // 2) and the response's first tokens."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    prompts, responses, templated = [], [], []
    for row, where in zip(rows.rows, rows.locations):
        p, r, t = _format_pair(tokenizer, row["prompt"], row["response"], use_chat_template, where)
        prompts.append(p)
        responses.append(r)
        templated.append(t)
    return _tokenize_pairs(tokenizer, prompts, responses, templated, max_length, max_prompt_length)


def tokenize_preference_rows(rows: Rows, tokenizer, max_length: int = 512, max_prompt_length: int | None = None,
                             use_chat_template: bool = True) -> list[PreferenceExample]:
    """Tokenize validated preference rows into prompt+chosen / prompt+rejected id lists."""
    prompts, responses, templated = [], [], []
    for row, where in zip(rows.rows, rows.locations):
        for column in ("chosen", "rejected"):
            p, r, t = _format_pair(tokenizer, row["prompt"], row[column], use_chat_template, where)
            prompts.append(p)
            responses.append(r)
            templated.append(t)
    pairs = _tokenize_pairs(tokenizer, prompts, responses, templated, max_length, max_prompt_length)
    out = []
    for i, row in enumerate(rows.rows):
        c, r = pairs[2 * i], pairs[2 * i + 1]
        out.append(PreferenceExample(c.prompt_ids + c.response_ids, r.prompt_ids + r.response_ids,
                                     float(row.get("margin", 0.0))))
    return out


# --------------------------------------------------------------------------- batching
def length_grouped_batches(lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                           group_factor: int = 50) -> list[list[int]]:
    """Index batches of similar lengths, so padding is small.

    With ``shuffle``: shuffle all indices, cut them into groups of ``group_factor * batch_size``, sort
    each group by length (longest first), cut into batches and shuffle the batch order. Without: sort
    everything by length. Every index appears exactly once; the last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    rng = random.Random(seed)
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    order = list(range(n))
    rng.shuffle(order)
    group = max(batch_size, group_factor * batch_size)
    batches = []
    for g in range(0, n, group):
        chunk = sorted(order[g:g + group], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
                  pad_to_multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length: (input_ids int64 [B, T], attention_mask int64 [B, T])."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    T = int(lengths.max()) if len(seqs) else 0
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    flat = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seqs]) if len(seqs) else torch.zeros(0, dtype=torch.long)
    pos = torch.arange(T).expand(len(seqs), T)
    if side == "right":
        mask = pos < lengths[:, None]
    else:
        mask = pos >= (T - lengths)[:, None]
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    ids[mask] = flat  # row-major order of True positions == concatenation order of the rows
    return ids, mask.long()


def collate_sft(examples: Sequence[SFTExample], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask [B, T] and next-token ``labels`` [B, T].

    labels[b, t] = input_ids[b, t + 1] when position t + 1 is a response token, else -100 (so the
    hidden state at t is scored against the token it predicts; prompt and padding carry no loss).
    Also ``label_positions`` int64 [N]: flat indices b * T + t of the labelled positions (row-major),
    and ``target_ids`` int64 [N]: their labels.
    """
    seqs = [e.prompt_ids + e.response_ids for e in examples]
    ids, mask = pad_sequences(seqs, pad_id, "right", pad_to_multiple_of)
    T = ids.shape[1]
    prompt_len = torch.tensor([len(e.prompt_ids) for e in examples], dtype=torch.long)
    total_len = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    target_pos = torch.arange(1, T + 1).expand(len(seqs), T)  # position predicted from position t
    is_response = (target_pos >= prompt_len[:, None]) & (target_pos < total_len[:, None])
    next_ids = torch.cat([ids[:, 1:], torch.full((len(seqs), 1), pad_id, dtype=torch.long)], dim=1)
    labels = torch.where(is_response, next_ids, torch.full_like(ids, -100))
    # Computed here, on the host: boolean-mask indexing on a GPU would need a device->host sync
    # per micro-batch to learn N.
    label_positions = is_response.flatten().nonzero().squeeze(-1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "label_positions": label_positions, "target_ids": labels.flatten()[label_positions]}
