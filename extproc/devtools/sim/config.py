"""Simulator settings; field names mirror the vLLM server flags they stand in for."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = ephemeral
    # First served name: what vLLM puts in every response's `model` field.
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    # Further names accepted in requests (vLLM `--served-model-name a b c`).
    served_model_names: list[str] = field(default_factory=list)
    tokens_per_second: float = 0.0  # per choice; 0 = no delay
    ttft_ms: float = 0.0
    # Used when a chat request sends no max_tokens / max_completion_tokens (stands in for a
    # generation_config max_new_tokens; real vLLM would default to max_model_len - prompt).
    max_tokens_default: int = 64
    max_model_len: int = 131_072
    enable_force_include_usage: bool = False  # --enable-force-include-usage
    enable_prompt_tokens_details: bool = False  # --enable-prompt-tokens-details
    # Behave like a model served with --reasoning-parser: reasoning text first.
    reasoning: bool = False
    # vLLM main since Aug 2026 reports usage.completion_tokens_details.reasoning_tokens when a
    # reasoning parser is configured; older releases do not. False = behave like those.
    reasoning_tokens_details: bool = True
    seed: int = 0
    # vLLM --api-key: requests must carry exactly "Authorization: Bearer <api_key>" (and no
    # x-api-key). Stands in for an upstream that must never see a gateway's virtual keys.
    api_key: str = ""
    # Refuse any request that carries Authorization or x-api-key at all (a gateway that removes
    # client keys must leave none).
    reject_any_key: bool = False
    embedding_dim: int = 4096  # Llama 3.1 8B hidden size
    kv_cache_blocks: int = 8192  # for vllm:kv_cache_usage_perc
    block_size: int = 16  # prefix-cache block size, as vLLM's default

    @property
    def served_names(self) -> list[str]:
        return [self.model, *(n for n in self.served_model_names if n != self.model)]
