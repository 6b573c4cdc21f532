"""A transformers VLM's language model as a vgt ``ARBackbone``: tokenizer, chat template, KV cache.

Only the base text model is kept (no vision tower, no LM head): VGT reads its hidden states, never logits.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, DynamicCache, PretrainedConfig

from vgt_adapters.options import LanguageOptions, PretrainedOptions  # noqa: F401 -- re-exported
from vgt_adapters.hf_common import (
    checkpoint_transformer,
    export_config,
    load_part,
    resolve_config,
    torch_dtype,
)


class HFLanguageBackbone(nn.Module):
    """Base of VLM language backbones; subclasses set the classes and the image-start token."""

    model_class: ClassVar[Any]
    config_class: ClassVar[type[PretrainedConfig]]
    default_image_start: ClassVar[str | None] = None

    def __init__(self, options: LanguageOptions):
        super().__init__()
        self.options = options
        self.config = resolve_config(options, self.config_class)
        self.config.text_config._attn_implementation = options.attn_implementation
        if options.pretrained is not None and options.load_weights:
            # only the language model is built and read (no vision tower, no LM head)
            self.lm = load_part(self.model_class, self.config, self.keep_language, options)
        else:  # the text model is a transformers model of its own: built directly from its config
            self.lm = AutoModel.from_config(
                self.config.text_config,
                attn_implementation=options.attn_implementation,
                dtype=torch_dtype(options.dtype) or torch.float32,
            )
        self.hidden_size = self.config.text_config.hidden_size
        self._cache_keyword = _cache_keyword(self.lm)  # once: forward runs on every decoding step
        self.tokenizer = self._load_tokenizer(options)
        start = options.image_start_token or self.default_image_start
        vocab = self.tokenizer.get_vocab()
        self.image_start_id = vocab.get(start) if start else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if len(self.tokenizer) > self.lm.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model embeds only "
                f"{self.lm.get_input_embeddings().num_embeddings}"
            )

    def keep_language(self, vlm: nn.Module) -> nn.Module:
        """The base text model of the VLM (built on the meta device: only this part gets weights); the same class
        ``AutoModel.from_config(text_config)`` builds."""
        return vlm.model.language_model

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LM's layers in the backward pass (transformers' own switch, non-reentrant)."""
        checkpoint_transformer(self.lm)

    @staticmethod
    def _load_tokenizer(options: LanguageOptions) -> Any:
        source = options.tokenizer or options.pretrained
        if source is None:
            from vgt_adapters.tokenizers import byte_level_tokenizer

            return byte_level_tokenizer()
        return AutoTokenizer.from_pretrained(source, revision=options.revision)

    # -- ARBackbone ---------------------------------------------------------------------------------------------

    def token_ids(self, prompt: str, max_tokens: int | None = None) -> list[int]:
        """The prompt's ids (chat template, then the image-start token); the text part is cut to ``max_tokens``
        as upstream's tokenizer call (``max_length``, truncation) does."""
        if self.options.use_chat_template and self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = list(ids)
        if max_tokens is not None and len(ids) > max_tokens:
            warnings.warn(
                f"a prompt of {len(ids)} tokens was cut to its first {max_tokens} (generator.max_prompt_tokens): "
                f"{prompt[:60]!r}...",
                stacklevel=2,
            )
            ids = ids[:max_tokens]
        if self.image_start_id is not None:
            ids.append(self.image_start_id)
        return ids

    def embed_prompts(self, prompts: list[str], max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.token_ids(p, max_tokens) for p in prompts]
        length = max(len(i) for i in ids)
        device = self.lm.get_input_embeddings().weight.device
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(ids), length), dtype=torch.long, device=device)
        for row, seq in enumerate(ids):  # left padding: every prompt ends where the image begins
            input_ids[row, length - len(seq) :] = torch.tensor(seq, device=device)
            mask[row, length - len(seq) :] = 1
        return self.lm.get_input_embeddings()(input_ids), mask

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any | None = None,
    ) -> tuple[torch.Tensor, Any | None]:
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_keyword: cache},
        )
        return out.last_hidden_state, next((out[key] for key in ("cache", "past_key_values") if key in out.keys()), None)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.lm.config)

    def export(self, folder: Path) -> dict:
        """The tokenizer and the VLM config without its vision tower, so a reload never builds it."""
        self.tokenizer.save_pretrained(folder)
        return export_config(self.config, folder, self.options, drop="vision_config", tokenizer=".")


def _cache_keyword(lm: torch.nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x (the old name goes in 5.40): pass the KV
    cache under whichever name this version's model takes."""
    return "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"
