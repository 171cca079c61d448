"""Model architecture presets (Hugging Face ``config.json`` files, no weights) for ``rlhf-fast memory``.

Found by file stem, case-insensitive: ``qwen2.5-0.5b``, ``qwen2.5-7b``, ``llama-3-8b`` (alias ``llama3-8b``),
``llama-3-70b``. The numbers are the published architectures (hidden, intermediate, layers, heads, KV
heads, vocab, tied embeddings, rope theta), so parameter counts match the released checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent


def available_presets() -> list[str]:
    """Preset names (file stems), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace("llama3", "llama-3")


def find_preset(name: str) -> Path | None:
    """Path of the preset called ``name`` (case-insensitive, ``llama3-8b`` == ``llama-3-8b``), or None."""
    key = _normalise(name)
    for stem in available_presets():
        if _normalise(stem) == key:
            return PRESET_DIR / f"{stem}.json"
    return None


def load_preset(name: str) -> dict:
    """The preset's config dict; ValueError listing the presets when ``name`` is unknown."""
    path = find_preset(name)
    if path is None:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(available_presets())}")
    return json.loads(path.read_text())


__all__ = ["PRESET_DIR", "available_presets", "find_preset", "load_preset"]
