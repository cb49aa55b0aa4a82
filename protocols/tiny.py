"""A tiny random Llama with a byte-level tokenizer, built in-process with a fixed seed.

It has the same module names as a real Llama (model.layers.N.self_attn.q_proj, …) and a ChatML
chat template, so every code path runs on it in well under a second.
"""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=None, eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token=None)
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save_tiny_llama(out: str | Path, seed: int = 0) -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
