"""Build a small Llama-architecture model with a locally trained tokenizer.

There is no Hugging Face hub here, so the demo, the tests and the benchmarks
train on a model made from scratch: a byte-level BPE tokenizer trained on a
small built-in corpus (plus any text files given), a chat template that marks
assistant turns for assistant-only loss, and random LlamaForCausalLM weights.

    python scripts/build_tiny_model.py models/tiny-llama
    python scripts/build_tiny_model.py models/llama-34m --preset 34m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESETS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (64, 2, 4, 2, 128, 512),
    "34m": (512, 8, 8, 8, 1408, 8000),
    "150m": (768, 12, 12, 12, 2048, 16000),
    "500m": (1024, 24, 16, 8, 4096, 32000),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]

CORPUS = """
Machine learning is a branch of artificial intelligence that learns patterns from data.
Direct preference optimization trains a language model from pairs of preferred and rejected answers.
A helpful assistant answers the question clearly, politely and with correct facts.
The capital of France is Paris. Water boils at one hundred degrees Celsius at sea level.
Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.
Python is a programming language that is easy to read. Gradient descent minimises a loss function.
The quick brown fox jumps over the lazy dog. Please explain the answer step by step.
"""


def corpus_lines(extra_files: list[Path]) -> list[str]:
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    for path in extra_files:
        text = path.read_text()
        if path.suffix in (".json", ".jsonl"):
            # pull every string out of the JSON so the tokenizer sees the training vocabulary
            def strings(obj):
                if isinstance(obj, str):
                    yield obj
                elif isinstance(obj, dict):
                    for v in obj.values():
                        yield from strings(v)
                elif isinstance(obj, list):
                    for v in obj:
                        yield from strings(v)

            docs = [json.loads(x) for x in text.splitlines() if x.strip()] if path.suffix == ".jsonl" else [json.loads(text)]
            lines.extend(s for d in docs for s in strings(d))
        else:
            lines.extend(text.splitlines())
    return lines


def build(out: Path, preset: str, extra_files: list[Path], seed: int = 0) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, kv_heads, intermediate, vocab = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_lines(extra_files), vocab_size=vocab, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 2048
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {preset} model: {n_params:,} parameters, vocab {len(tokenizer)} -> {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to write the model into")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    parser.add_argument("--corpus", type=Path, action="append", default=[], help="extra text/JSON files for the tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.out, args.preset, args.corpus, args.seed)


if __name__ == "__main__":
    main()
