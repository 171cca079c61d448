"""Stage output directories: written aside, marked complete last, renamed into place.

A stage (sft, rm, ppo, ...) writes a Hugging Face directory (config.json + model.safetensors +
tokenizer files) that the next stage loads by path. So that a half-written directory is never
mistaken for a finished one:

1. everything goes into a hidden temporary sibling ``.<name>.tmp-<pid>-<random>`` (training
   metrics are streamed there while the stage runs, weights are saved there at the end);
2. the last file written is ``COMPLETE``: a small JSON summary (stage, time, metrics);
3. the temporary directory is renamed onto ``out_dir`` (a previous finished output there is moved
   aside first and deleted only after the new one is in place).

A stage that fails or is killed before step 3 leaves the previous ``out_dir`` untouched; a failed one
also removes its temporary directory. ``require_finished_stage(path)`` is what a stage calls on its
input: it refuses a directory without ``COMPLETE``, naming the directory and the fix.
``load_stage_causal_lm`` and ``load_reward_model`` load a stage's input model that way (a finished
stage directory, or a hub name), for every stage that reads one (RM, DPO, PPO).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "COMPLETE_MARKER", "StageDirectory", "StageNotFinishedError", "StageOutputError", "is_finished_stage", "read_stage_summary",
    "require_finished_stage", "save_stage", "load_from_stage", "load_stage_causal_lm", "load_reward_model",
]

COMPLETE_MARKER = "COMPLETE"


class StageNotFinishedError(ValueError):
    """A stage input directory is missing, or was never marked COMPLETE."""


class StageOutputError(ValueError):
    """A stage's output_dir cannot be used (a file, or a non-empty directory that is not a stage's output)."""


def is_finished_stage(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def read_stage_summary(path: str | os.PathLike) -> dict:
    """The JSON summary in ``path/COMPLETE`` (raises StageNotFinishedError when absent or unreadable)."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageNotFinishedError(f"{str(path)!r} has no {COMPLETE_MARKER} marker") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageNotFinishedError(f"{str(marker)!r} is not a valid stage summary (JSON): {e}") from None
    if not isinstance(data, dict):
        raise StageNotFinishedError(f"{str(marker)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def require_finished_stage(path: str | os.PathLike, stage: str | None = None, what: str = "input model") -> dict:
    """Check that ``path`` is a finished stage directory and return its summary.

    stage: when given (e.g. "sft"), the summary's ``stage`` must match. Raises StageNotFinishedError
    naming the directory and how to fix it.
    """
    p = Path(path)
    hint = f"run `rlhf-fast {stage} ...` with output_dir={str(p)!r} first" if stage else "run the stage that writes it first"
    if not p.exists():
        raise StageNotFinishedError(f"{what} directory {str(p)!r} does not exist: {hint}, or fix the path")
    if not p.is_dir():
        raise StageNotFinishedError(f"{what} {str(p)!r} is a file, expected a stage output directory")
    if not is_finished_stage(p):
        raise StageNotFinishedError(
            f"{what} directory {str(p)!r} has no {COMPLETE_MARKER} marker: the stage that writes it did not finish "
            f"(it failed, was killed, or is still running) or the directory was not written by rlhf-fast. "
            f"Fix: {hint} and let it complete"
        )
    summary = read_stage_summary(p)
    if stage is not None and summary.get("stage") not in (None, stage):
        raise StageNotFinishedError(
            f"{what} directory {str(p)!r} holds the output of stage {summary.get('stage')!r}, expected {stage!r}"
        )
    return summary


def _check_replaceable(out: Path) -> None:
    """Refuse to replace an existing non-empty directory that is not a finished stage (e.g. ``output_dir=.``)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise StageOutputError(f"output_dir {str(out)!r} exists and is a file; choose a directory path")
    if is_finished_stage(out) or not any(out.iterdir()):
        return
    raise StageOutputError(
        f"output_dir {str(out)!r} exists, is not empty and is not a finished stage directory (no "
        f"{COMPLETE_MARKER} marker); refusing to replace it. Choose a new output_dir or remove that directory"
    )


class StageDirectory:
    """Context manager for one stage's output: ``path`` is the temporary directory while the stage runs.

        with StageDirectory("runs/sft") as stage_dir:
            ... write stage_dir.path / "metrics.jsonl" while training ...
            stage_dir.finish(model, tokenizer, summary={"final_eval_loss": 1.23})

    Leaving the block without ``finish()`` (an exception) deletes the temporary directory and leaves
    ``out_dir`` as it was. The output directory is checked on construction, so a stage fails before
    training rather than after.
    """

    def __init__(self, out_dir: str | os.PathLike, stage: str | None = None):
        self.out_dir = Path(out_dir)
        self.stage = stage
        _check_replaceable(self.out_dir)
        self.path: Path | None = None
        self.finished = False

    def __enter__(self) -> StageDirectory:
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        self.path = parent / f".{self.out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.finished and self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def finish(self, model=None, tokenizer=None, summary: dict[str, Any] | None = None) -> Path:
        """Save model/tokenizer (safetensors), write COMPLETE, rename into ``out_dir``; returns ``out_dir``."""
        if self.path is None:
            raise RuntimeError("StageDirectory.finish() called outside its `with` block")
        if model is not None:
            model.save_pretrained(self.path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.path)
        record = {"stage": self.stage, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        record.update(summary or {})
        marker = self.path / COMPLETE_MARKER
        with open(marker, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _check_replaceable(self.out_dir)  # something may have appeared there while the stage ran
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, old)
        os.replace(self.path, self.out_dir)
        self.finished = True
        self.path = self.out_dir
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir


def _json_default(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.item() if o.numel() == 1 else o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    print(f"rlhf_fast.stages.io: summary value of type {type(o).__name__} written as its repr", file=sys.stderr)
    return repr(o)


def save_stage(model, tokenizer, out_dir: str | os.PathLike, summary: dict[str, Any] | None = None,
               stage: str | None = None) -> Path:
    """Write ``model`` + ``tokenizer`` as a finished stage directory at ``out_dir`` (see module docstring)."""
    if stage is None and summary:
        stage = summary.get("stage")
    with StageDirectory(out_dir, stage=stage) as d:
        return d.finish(model, tokenizer, summary)


# --------------------------------------------------------------------------- input models
T = TypeVar("T")


def load_from_stage(name: str, what: str, allow_unmarked: bool, load: Callable[[], T]) -> T:
    """``load()`` a stage's input model named ``name`` (the config key ``what`` holds it), refusing first a
    local directory without the COMPLETE marker (unless ``allow_unmarked``: any local HF directory) and a
    missing local path; a name that is neither a local directory nor on the hub raises StageNotFinishedError
    saying both."""
    path = Path(name)
    if path.exists():
        if not allow_unmarked:
            require_finished_stage(path, what=what)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        require_finished_stage(path, stage="sft", what=what)  # a local path that is missing: raises with the fix
    try:
        return load()
    except OSError as e:
        if path.exists():
            raise
        raise StageNotFinishedError(
            f"{what} {name!r} is neither a local directory (it does not exist: run `rlhf-fast sft ... "
            f"output_dir={name}` first, or fix the path) nor a model that could be fetched from the Hugging Face "
            f"hub ({str(e).splitlines()[0]})"
        ) from e


def load_stage_causal_lm(name: str, what: str, allow_unmarked: bool = False, attn_implementation: str | None = None):
    """An fp32 causal LM from a finished stage directory (or, with ``allow_unmarked``, any local HF dir) or a
    hub name (see ``load_from_stage``)."""
    import torch

    from rlhf_fast.models.loading import load_causal_lm

    return load_from_stage(name, what, allow_unmarked, lambda: load_causal_lm(
        name, dtype=torch.float32, attn_implementation=attn_implementation))


def load_reward_model(model_name_or_path: str, tokenizer=None, allow_unmarked_model_dir: bool = False,
                      attn_implementation: str | None = None, tokenizer_name_or_path: str | None = None):
    """(AutoModelForSequenceClassification with num_labels=1, tokenizer) from a finished stage directory.

    From an SFT directory the backbone weights are carried over and the ``score`` head is new
    (initialised by transformers); from an RM directory everything is loaded. A local directory
    without the COMPLETE marker is refused unless ``allow_unmarked_model_dir``.
    """
    import warnings

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rlhf_fast.models.loading import (
        ensure_pad_token,
        from_pretrained_or_explain,
        resolve_attn_implementation,
    )

    def load():
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized score.weight" is expected from an SFT directory
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return AutoModelForSequenceClassification.from_pretrained(
                    model_name_or_path, num_labels=1, dtype=torch.float32,
                    attn_implementation=resolve_attn_implementation(attn_implementation),
                )
        finally:
            hf_logging.set_verbosity(verbosity)

    model = load_from_stage(model_name_or_path, "rm model_name_or_path", allow_unmarked_model_dir, load)
    if tokenizer is None:
        tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained,
                                               tokenizer_name_or_path or model_name_or_path, "tokenizer")
    ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
