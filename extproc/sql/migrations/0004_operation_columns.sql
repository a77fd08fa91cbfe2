-- Every vLLM inference route is metered (README, "Endpoints"): the OpenTelemetry GenAI
-- operation name of each request (chat, text_completion, embeddings, or the documented custom
-- names rerank, score, classify, pooling, transcription, translation), the prompt tokens the
-- Anthropic Messages API reports as written to the prompt cache, and the seconds of audio a
-- transcription or translation reports. Old rows read '' and 0.
ALTER TABLE usage_events
    ADD COLUMN IF NOT EXISTS operation LowCardinality(String) DEFAULT '' AFTER endpoint,
    ADD COLUMN IF NOT EXISTS cache_creation_tokens UInt64 DEFAULT 0 AFTER cached_tokens,
    ADD COLUMN IF NOT EXISTS audio_seconds UInt32 DEFAULT 0 AFTER total_tokens;
