"""How far the last-resort prompt count (no chat template, no /tokenize) is from what vLLM
counts, on a few chat prompts: the served model's tokenizer.json alone, and tiktoken o200k_base
(no tokenizer of the model at all). Truth: the simulator's count (Llama 3 chat template).

    python -m bench.prompt_estimate
"""

from __future__ import annotations

from extproc.devtools.sim.generation import chat_prompt_ids
from extproc.processors import ProcessorContext
from extproc.processors.chat import ChatProcessor
from extproc.tokenizers import TokenizerRegistry, llama3_tokenizer_path

LONG = ("Our platform team shares eight GPUs between search, support and ads; every request carries "
        "a team header and we need a monthly bill per team and feature. ")
CHATS = {
    "2 short messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],
    "system + question": [{"role": "system", "content": "You are terse."},
                          {"role": "user", "content": "What is a chargeback report?"}],
    "one paragraph": [{"role": "user", "content": LONG}],
    "4-turn chat": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is a ledger?"},
                    {"role": "assistant", "content": "Un registre."}, {"role": "user", "content": "And an invoice?"}],
    "long document": [{"role": "system", "content": "Summarize."}, {"role": "user", "content": LONG * 20}],
    "non-English": [{"role": "user", "content": "東京の天気は？ Привет, как дела? مرحبا"}],
}


def main() -> None:
    bare = TokenizerRegistry(models={"m": llama3_tokenizer_path()}).for_model("m")
    tiktoken = TokenizerRegistry().for_model("other")
    print("| prompt | vLLM (template) | tokenizer.json alone | error | tiktoken o200k_base | error |")
    print("|---|---|---|---|---|---|")
    for name, messages in CHATS.items():
        p = ChatProcessor(ProcessorContext(TokenizerRegistry()))
        p.request = {"messages": messages}
        truth = len(chat_prompt_ids(messages))
        a, b = bare.count(p.prompt_text()), tiktoken.count(p.prompt_text())
        print(f"| {name} | {truth} | {a} | {100 * (a - truth) / truth:+.0f}% | {b} | {100 * (b - truth) / truth:+.0f}% |")


if __name__ == "__main__":
    main()
