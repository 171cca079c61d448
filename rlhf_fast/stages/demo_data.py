"""The embedded demo, data side: corpus, tokenizer, tiny model, SFT pairs, prompts and the gold judge.

Everything here works offline: the corpus is English text that ships with Python
(``pydoc_data.topics``, the interactive help's language-reference topics; when a Python install
lacks that module, ``rlhf_fast/stages/demo_corpus.txt`` is used), the tokenizer is a byte-level BPE
trained on that corpus with ``tokenizers``, and the model is a Qwen2-style config with random
weights.

The gold judge (pinned; the pipeline labels preference pairs with it and reports it):

    TARGET = {function object value return list string module class method argument
              default example type number error file name data code statement}
    words  = the lowercase [a-z]+ runs of the response (text lowercased first); n = len(words)
    gold   = -1                                                        if n == 0, else
    gold   = 2 * target_share - repeat_share - 0.5 * min(1, |n - 30| / 30)
      target_share = (# words in TARGET) / n
      repeat_share = (# of the n-1 word bigrams (w_i, w_{i+1}) equal to an earlier bigram
                      (w_j, w_{j+1}), j < i, of the same response) / (n - 1);  0 when n == 1
    P(a preferred over b) = sigmoid(5 * (gold(a) - gold(b)))

So a good response talks about programming terms, does not loop, and is about 30 words long.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import NamedTuple

__all__ = [
    "TARGET_WORDS", "DEMO_SPECIAL_TOKENS", "words", "gold_reward", "gold_prefers", "preference_probability",
    "preference_label", "distinct_n", "load_corpus_text", "corpus_paragraphs", "split_paragraphs",
    "CorpusSplit", "demo_corpus", "sft_pairs", "prompts_from_paragraphs", "synthetic_preference_rows",
    "build_demo_tokenizer", "tiny_model_config", "build_demo_model",
]

TARGET_WORDS = frozenset(
    "function object value return list string module class method argument "
    "default example type number error file name data code statement".split()
)
_WORD_RE = re.compile(r"[a-z]+")
DEMO_SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}


# --------------------------------------------------------------------------- the gold judge
def words(text: str) -> list[str]:
    """The lowercase [a-z]+ runs of ``text`` after lowercasing ("Don't stop" -> ["don", "t", "stop"])."""
    return _WORD_RE.findall(text.lower())


def gold_reward(text: str) -> float:
    """The pinned gold score of a response (see the module docstring): 2·target − repeats − length penalty."""
    w = words(text)
    n = len(w)
    if n == 0:
        return -1.0
    target_share = sum(x in TARGET_WORDS for x in w) / n
    repeated = 0
    seen: set[tuple[str, str]] = set()
    for bigram in zip(w, w[1:]):
        if bigram in seen:
            repeated += 1
        else:
            seen.add(bigram)
    repeat_share = repeated / (n - 1) if n > 1 else 0.0
    length_penalty = 0.5 * min(1.0, abs(n - 30) / 30)
    return 2.0 * target_share - repeat_share - length_penalty


def preference_probability(a: str, b: str) -> float:
    """P(a preferred over b) = sigmoid(5 · (gold(a) − gold(b)))."""
    d = 5.0 * (gold_reward(a) - gold_reward(b))
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


def gold_prefers(a: str, b: str) -> bool:
    """Noiseless label: True when gold(a) > gold(b) (ties -> False)."""
    return gold_reward(a) > gold_reward(b)


def preference_label(a: str, b: str, rng) -> bool:
    """Noisy label: True (a preferred) with probability sigmoid(5·(gold(a) − gold(b))).

    rng: anything with ``.random()`` returning a uniform in [0, 1) (``random.Random``, numpy Generator).
    """
    return rng.random() < preference_probability(a, b)


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Distinct-n over a set of responses: unique word n-grams / total word n-grams (0.0 when there are none).

    Words as in the gold judge (lowercase [a-z]+ runs); n-grams do not cross response boundaries.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        w = words(text)
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


# --------------------------------------------------------------------------- corpus
def load_corpus_text() -> tuple[str, str]:
    """(text, source name): ``pydoc_data.topics`` when importable, else the shipped fallback file."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        text = resources.files("rlhf_fast.stages").joinpath("demo_corpus.txt").read_text(encoding="utf-8")
        text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        return text, "rlhf_fast/stages/demo_corpus.txt"
    return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"


_PROSE_WORD = re.compile(r"[A-Za-z][a-z]*[,.;:]?")


def corpus_paragraphs(text: str, min_words: int = 24, min_prose_share: float = 0.7) -> list[str]:
    """Paragraphs (blank-line separated, whitespace collapsed) that read as prose.

    Keeps paragraphs with at least ``min_words`` words of which at least ``min_prose_share`` are
    plain words (grammar rules and code samples in the help topics fail this).
    """
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        w = para.split()
        if len(w) < min_words:
            continue
        if sum(bool(_PROSE_WORD.fullmatch(x)) for x in w) / len(w) < min_prose_share:
            continue
        out.append(para)
    return out


class CorpusSplit(NamedTuple):
    train: list[str]
    heldout: list[str]
    source: str


def split_paragraphs(paragraphs: Sequence[str], heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split by a hash of each paragraph (stable across runs and orderings)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    train, heldout = [], []
    for p in paragraphs:
        h = int.from_bytes(hashlib.sha1(p.encode("utf-8")).digest()[:8], "big") / 2.0**64
        (heldout if h < heldout_fraction else train).append(p)
    return train, heldout


def demo_corpus(heldout_fraction: float = 0.1) -> CorpusSplit:
    """The demo corpus split into train and held-out paragraphs."""
    text, source = load_corpus_text()
    train, heldout = split_paragraphs(corpus_paragraphs(text), heldout_fraction)
    return CorpusSplit(train, heldout, source)


def sft_pairs(
    paragraphs: Iterable[str], prompt_words: int = 8, response_words: int = 30, min_response_words: int = 10,
    windows_per_paragraph: int | None = None,
) -> list[dict]:
    """SFT rows ``{"prompt", "response"}``: prompt = k words, response = " " + the next ~30 words.

    Each paragraph is cut into consecutive windows of ``prompt_words + response_words`` words (the
    first window starts the paragraph; ``windows_per_paragraph=1`` keeps only that one); a last window
    shorter than ``prompt_words + min_response_words`` is dropped. prompt + response is the original text.
    """
    if prompt_words < 1 or response_words < 1:
        raise ValueError("prompt_words and response_words must be >= 1")
    rows = []
    span = prompt_words + response_words
    for para in paragraphs:
        w = para.split()
        for k, start in enumerate(range(0, len(w), span)):
            if windows_per_paragraph is not None and k >= windows_per_paragraph:
                break
            window = w[start:start + span]
            if len(window) < prompt_words + min_response_words:
                break
            rows.append({"prompt": " ".join(window[:prompt_words]), "response": " " + " ".join(window[prompt_words:])})
    return rows


def prompts_from_paragraphs(paragraphs: Iterable[str], prompt_words: int = 8) -> list[str]:
    """The opening ``prompt_words`` words of each paragraph (the PPO prompts come from held-out ones)."""
    return [" ".join(p.split()[:prompt_words]) for p in paragraphs if len(p.split()) >= prompt_words]


def synthetic_preference_rows(
    paragraphs: Sequence[str], num_pairs: int, seed: int = 0, prompt_words: int = 8, noisy: bool = True,
) -> list[dict]:
    """Preference rows ``{"prompt", "chosen", "rejected"}`` built from the corpus alone, labelled by the gold judge.

    For the standalone ``rlhf-fast rm`` demo (the pipeline instead samples pairs from the SFT model).
    Candidate responses for a prompt: the true ~30-word continuation, a short cut of it, a looping
    one (its first words repeated), the continuation of another paragraph, and one padded with
    TARGET words. Two distinct candidates are drawn; ``preference_label`` (noisy) or ``gold_prefers``
    orders them.
    """
    rng = random.Random(seed)
    usable = [p.split() for p in paragraphs if len(p.split()) >= prompt_words + 12]
    if len(usable) < 2:
        raise ValueError("synthetic_preference_rows needs at least 2 paragraphs of >= prompt_words + 12 words")
    target = sorted(TARGET_WORDS)
    rows = []
    while len(rows) < num_pairs:
        w = rng.choice(usable)
        other = rng.choice(usable)
        prompt = " ".join(w[:prompt_words])
        cont = w[prompt_words:prompt_words + 30]
        loop = (cont[:rng.randint(2, 5)] * 12)[: rng.randint(20, 40)]
        spiced = list(cont)
        for _ in range(rng.randint(3, 10)):
            spiced.insert(rng.randrange(len(spiced) + 1), rng.choice(target))
        candidates = [
            cont,
            cont[: rng.randint(3, 10)],
            loop,
            other[prompt_words:prompt_words + rng.randint(15, 45)],
            spiced,
        ]
        a, b = rng.sample(candidates, 2)
        a_text, b_text = " " + " ".join(a), " " + " ".join(b)
        if a_text == b_text:
            continue
        a_first = preference_label(a_text, b_text, rng) if noisy else gold_prefers(a_text, b_text)
        chosen, rejected = (a_text, b_text) if a_first else (b_text, a_text)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# --------------------------------------------------------------------------- tokenizer and tiny model
def build_demo_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts`` (default: the demo corpus's train paragraphs).

    Special tokens <pad> (id 0), <eos> (1), <bos> (2); no chat template (prompts are plain text);
    nothing is added automatically around a text. Returns a ``transformers.PreTrainedTokenizerFast``
    (``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip). Deterministic for a given input.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = demo_corpus().train
    texts = list(texts)
    if not texts:
        raise ValueError("build_demo_tokenizer needs at least one text to train on")
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    specials = [DEMO_SPECIAL_TOKENS[k] for k in ("pad_token", "eos_token", "bos_token")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **DEMO_SPECIAL_TOKENS)


def tiny_model_config(
    vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    intermediate_size: int = 256, max_position_embeddings: int = 512, pad_token_id: int | None = 0,
    eos_token_id: int | None = 1, bos_token_id: int | None = 2,
):
    """A Qwen2 config for the tiny demo model (untied embeddings, as in the benchmark model)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
    )


def build_demo_model(tokenizer, seed: int = 0, **config_kwargs):
    """A random-init tiny Qwen2ForCausalLM matching ``tokenizer`` (vocab and special-token ids), fp32."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = tiny_model_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model
