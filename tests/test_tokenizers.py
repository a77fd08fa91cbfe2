"""Tokenizer registry: a model's own tokenizer.json when configured, tiktoken otherwise, loaded
once per file; a tokenizer that cannot be loaded must not stop metering."""

from __future__ import annotations

import logging

from extproc.tokenizers import TokenizerRegistry, llama3_tokenizer_path


def test_configured_models_use_their_tokenizer_and_others_tiktoken():
    reg = TokenizerRegistry(models={"llama": "llama3", "llama-too": "llama3", "bare": llama3_tokenizer_path()})
    llama, other = reg.for_model("llama"), reg.for_model("gpt-oss")
    assert llama.name.startswith("hf:") and other.name == "tiktoken:o200k_base"
    assert reg.for_model("llama-too") is llama  # one load per file, shared by model names
    # "llama3" brings the shipped chat template; a bare tokenizer.json (no tokenizer_config.json
    # beside it) has none
    assert llama.chat is not None and reg.for_model("bare").chat is None and other.chat is None
    assert reg.for_model("another") is other
    text = "Chargeback for GPUs, café, 日本語."
    assert llama.count(text) > 0 and other.count(text) > 0
    assert other.count("<|endoftext|>") > 1  # special-token text is counted as text, never raises


def test_a_tokenizer_that_cannot_be_loaded_falls_back_to_tiktoken(tmp_path, caplog):
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not a tokenizer")
    reg = TokenizerRegistry(default_encoding="cl100k_base",
                            models={"missing": str(tmp_path / "absent.json"), "broken": str(broken)})
    with caplog.at_level(logging.ERROR, logger="extproc.tokenizers"):
        for model in ("missing", "broken"):
            counter = reg.for_model(model)
            assert counter.name == "tiktoken:cl100k_base" and counter.count("hello world") == 2
    logged = [r.getMessage() for r in caplog.records]
    assert any("absent.json" in m and "counting with tiktoken:cl100k_base" in m for m in logged)
    assert any(str(broken) in m for m in logged)
