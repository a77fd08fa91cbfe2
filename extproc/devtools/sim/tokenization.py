"""/tokenize and /detokenize as vLLM serves them (entrypoints/openai serving_tokenization):
a text prompt (`add_special_tokens` true by default: the BOS) or chat messages rendered with the
chat template (`add_generation_prompt` true, `add_special_tokens` false by default), answered
with {count, max_model_len, tokens, token_strs}. Counted exactly as chat and completions count
their prompts, so a sidecar that asks /tokenize gets the prompt_tokens the request would have had.
"""

from __future__ import annotations

from typing import Any

from extproc.devtools.sim import generation as gen
from extproc.devtools.sim.config import SimConfig
from extproc.devtools.sim.protocol import bad_request, check_model, field, validation_error


def tokenize(body: dict[str, Any], cfg: SimConfig) -> dict[str, Any]:
    check_model(body, cfg)
    want_strs = bool(field(body, "return_token_strs", bool, False))
    if "messages" in body:
        messages = field(body, "messages", list)
        for i, m in enumerate(messages or []):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise validation_error("missing", ("body", "messages", i, "role"), "Field required")
        add_generation_prompt = field(body, "add_generation_prompt", bool, True) is not False
        if add_generation_prompt and field(body, "continue_final_message", bool, False):
            raise validation_error("value_error", ("body",), "Value error, Cannot set both "
                                   "`continue_final_message` and `add_generation_prompt` to True.")
        try:
            ids = gen.chat_prompt_ids(messages or [], add_generation_prompt)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        if field(body, "add_special_tokens", bool, False):
            ids = [gen.BOS_ID, *ids]
    elif "prompt" in body:
        prompt = field(body, "prompt", str)
        if prompt is None:
            raise validation_error("string_type", ("body", "prompt"), "Input should be a valid string")
        ids = gen.text_prompt_ids(prompt) if field(body, "add_special_tokens", bool, True) else gen.encode(prompt)
    else:
        raise validation_error("missing", ("body", "prompt"), "Field required")
    strs = [gen.get_tokenizer().id_to_token(t) for t in ids] if want_strs else None
    return {"count": len(ids), "max_model_len": cfg.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(body: dict[str, Any], cfg: SimConfig) -> dict[str, Any]:
    check_model(body, cfg)
    tokens = field(body, "tokens", list)
    if tokens is None or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise validation_error("list_type", ("body", "tokens"), "Input should be a valid list of integers")
    if any(not 0 <= t < gen.VOCAB_SIZE for t in tokens):
        raise bad_request("Token id out of vocabulary")
    return {"prompt": gen.get_tokenizer().decode(tokens, skip_special_tokens=False)}
