"""Tiny models and a locally built tokenizer for tests: nothing is downloaded.

`tiny_tokenizer()` is character level (printable ASCII) with chat specials and a chat template;
`tiny_model(vocab_size=...)` is a randomly initialised Llama of a few thousand parameters.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<system>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    # BPE with no merges over one pre-token = one token per character; Fuse joins them back losslessly.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token=None, unk_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(
    vocab_size: int | None = None,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    dtype=torch.float32,
    tied: bool = True,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    vocab_size = vocab_size or len(tiny_tokenizer())
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).to(dtype)
    # A tied head makes a random model repeat its last input token (often a special one, so its text is
    # empty); `tied=False` gives varied text, which tests of sampling-based pipelines need.
    # Random init at std 0.02 gives nearly uniform next-token distributions; scale the head up so
    # tests see peaked, varied distributions like a trained model's.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.eval()
    return model


def untied_model(seed: int = 0, head_std: float = 1.0) -> LlamaForCausalLM:
    """A tiny Llama with an untied, moderately peaked head: varied distributions and texts that differ per
    seed (a tied, scaled-up head makes every seed predict 'repeat the last character')."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, head_std)
    return model.eval()
