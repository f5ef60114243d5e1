"""The decoder-LLM shapes the benchmarks share (random weights, built with
transformers: nothing downloads): Qwen2.5-0.5B (24 layers, d 896, 14 query /
2 KV heads of 64, SwiGLU 4864, vocab 151936, tied head) and Llama-3.2-1B (16
layers, d 2048, 32 query / 8 KV heads of 64, SwiGLU 8192, vocab 128256, tied
head)."""

from __future__ import annotations


def llm(name: str, layers: int | None = None):
    """The transformers model of shape ``name`` ("qwen" or "llama1b"),
    seeded; ``layers`` overrides the depth."""
    import torch
    import transformers

    torch.manual_seed(0)
    if name == "qwen":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=896, intermediate_size=4864, num_hidden_layers=layers or 24, num_attention_heads=14,
            num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True))
    if name == "llama1b":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers or 16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True))
    raise ValueError(f"unknown LLM shape {name!r}")
