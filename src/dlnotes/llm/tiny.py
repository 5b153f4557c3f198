"""A tiny random llama with its own tokenizer: the server's tests, llm-chat's smoke run and llama-decode's default.

Nothing to download: the tokenizer is trained here on a few sentences, the weights are random.
"""

from __future__ import annotations

import torch

from dlnotes.llm.models import LoadedModel

TINY_NAME = "tiny-random-llama"
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # SmolLM2's format


def tiny_model(context: int = 256, seed: int = 0) -> LoadedModel:
    """A 2-layer llama with random weights and a byte-level BPE tokenizer trained here on a few sentences.

    It talks nonsense, but goes through exactly the server's code paths (chat template, KV cache, sampling,
    UTF-8 pieces of multi-byte characters) in milliseconds per token, with nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([_TINY_CORPUS] * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LoadedModel(name=TINY_NAME, tokenizer=tokenizer, model=LlamaForCausalLM(config).eval(), context=context)


_TINY_CORPUS = """The capital of France is Paris. A film can be moving, funny or dull; critics say so in a line.
You are a helpful assistant. Hello! How can I help you today? Write a short story about a robot who paints.
Les élèves ont mangé des crêpes. 東京は日本の首都です。 Emoji travel too: 🤖🎨 and numbers 0123456789."""
