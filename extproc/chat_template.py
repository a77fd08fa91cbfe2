"""A served model's chat template, rendered the way Hugging Face and vLLM render it, so that a
chat prompt counted without the upstream's usage is counted as the model saw it.

The template comes from the model's `tokenizer_config.json` (`chat_template`, a string or a list
of named templates) or a `chat_template.jinja` next to it. Templates are user-supplied code:
they run in Jinja2's immutable sandbox, with the globals HF provides (`raise_exception`,
`strftime_now`) and the config's special tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(Exception):
    """The template could not be loaded or refused the messages (its raise_exception)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _token(value: Any) -> str:
    """Special tokens are strings or AddedToken dicts ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _text(content: Any) -> str:
    """vLLM's "string" content format: text parts joined with newlines; other parts (images,
    audio) have no text to count here."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str))
    return ""


def _arguments(value: Any) -> dict[str, Any]:
    """Tool-call arguments as templates get them from vLLM (and Transformers): a mapping, the
    JSON string decoded; empty, invalid or not an object becomes {}."""
    if isinstance(value, str) and value:
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _as_vllm_renders(message: dict[str, Any]) -> dict[str, Any]:
    """A copy of the message as vLLM hands it to the template: string content, the reasoning
    under both names, an assistant's tool-call arguments decoded (an empty list dropped)."""
    out = {**message, "content": _text(message.get("content"))}
    if isinstance(out.get("reasoning"), str):
        out.setdefault("reasoning_content", out["reasoning"])
    calls = out.get("tool_calls")
    if out.get("role") == "assistant" and isinstance(calls, list):
        if not calls:
            del out["tool_calls"]
        else:
            out["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"].get("arguments"))}}
                if isinstance(c, dict) and isinstance(c.get("function"), dict) else c for c in calls]
    return out


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    source: str
    template: jinja2.Template
    bos_token: str
    eos_token: str
    # The tokenizer adds BOS to plain text prompts (completions) itself.
    add_bos_token: bool

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        msgs = [_as_vllm_renders(m) for m in messages if isinstance(m, dict)]
        try:
            return self.template.render(
                messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                eos_token=self.eos_token, tools=None, documents=None,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template bug or unexpected message shape
            raise ChatTemplateError(f"{self.source}: {exc!r}") from exc


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None, **_: json.dumps(v, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env


def load_chat_template(config_path: str | Path) -> ChatTemplate | None:
    """The template of a tokenizer_config.json (or of chat_template.jinja beside it); None when
    the model has none (a base model). Raises ChatTemplateError on unreadable files."""
    path = Path(config_path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError) as exc:
        raise ChatTemplateError(f"cannot read {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ChatTemplateError(f"{path}: not a JSON object")
    source: Any = cfg.get("chat_template")
    if isinstance(source, list):  # named templates: the default one is the chat template
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja_file = path.parent / "chat_template.jinja"
    if not isinstance(source, str) and jinja_file.exists():
        source = jinja_file.read_text(encoding="utf-8")
    if not isinstance(source, str) or not source:
        return None
    try:
        template = _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"{path}: chat_template does not compile: {exc}") from exc
    return ChatTemplate(str(path), template, _token(cfg.get("bos_token")), _token(cfg.get("eos_token")),
                        cfg.get("add_bos_token") is True)
