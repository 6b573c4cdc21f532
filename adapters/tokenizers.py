"""A byte-level tokenizer built locally, for language models that come without one (random-weight configs).

Every UTF-8 byte is a token, plus the chat-template specials; nothing is downloaded. A backbone gets it only when
its options ask for it by name (``tokenizer: byte-level``): a real model's own tokenizer is never replaced by it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

#: the value of a backbone's ``tokenizer`` option that selects this tokenizer
BYTE_LEVEL = "byte-level"
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<img>"]
BYTE_LEVEL_SIZE = len(SPECIALS) + 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(extra_specials: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """260 tokens: 4 specials then the 256 bytes (as byte-level BPE without merges), then ``extra_specials`` not
    already among them (a family's image-start token, so a random-weight model keeps its prompt layout)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS[1:] + [s for s in dict.fromkeys(extra_specials) if s and s not in SPECIALS]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", additional_special_tokens=specials)
    fast.chat_template = CHAT_TEMPLATE
    return fast
