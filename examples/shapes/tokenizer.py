"""A word-level tokenizer for the shapes world, built locally with ``tokenizers`` (no hub tokenizer is
reachable, and a few dozen words cover the world's captions, prompts and questions).

It carries a chat template in the Qwen/InternVL layout, so the language model sees prompts exactly as a real
VLM would: ``<|im_start|>user {prompt}<|im_end|><|im_start|>assistant``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vgt_shapes.world import COLORS, NUMBER_WORDS, RELATIONS, SHAPES

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
WORDS = sorted(
    {"a", "an", "photo", "of", "and", "the"}
    | {"describe", "generate", "image", "user", "assistant", ":", ".", ","}
    | set(SHAPES)
    | {s + "s" for s in SHAPES}
    | set(COLORS)
    | set(NUMBER_WORDS.values())
    | {w for r in RELATIONS for w in r.split()}
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The same vocabulary (ids) every time: specials first, then the sorted words."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", additional_special_tokens=SPECIALS[2:]
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
