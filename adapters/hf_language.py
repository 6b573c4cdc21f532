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
from transformers import AutoModel, AutoTokenizer, DynamicCache, PretrainedConfig, PreTrainedModel, StaticCache

from vgt_adapters.options import LanguageOptions, PretrainedOptions  # noqa: F401 -- re-exported
from vgt_adapters.hf_common import (
    checkpoint_transformer,
    export_config,
    load_part,
    other_sub_configs,
    resolve_config,
    text_config_name,
    torch_dtype,
)
from vgt_adapters.tokenizers import BYTE_LEVEL, BYTE_LEVEL_SIZE
from vgt_core.errors import ConfigError


class HFLanguageBackbone(nn.Module):
    """Base of VLM language backbones: a family sets two class attributes, usually nothing else.

    Set by a subclass (class attributes):

    ==========================  ============================================================================
    ``model_class``             required: the transformers VLM class (``...ForConditionalGeneration``)
    ``config_class``            required: its config class (``config`` dicts are read with it)
    ``default_image_start``     ``None``: the token appended after every prompt (where the image begins);
                                ``image_start_token`` overrides it; nothing is appended when it is not one
                                token of the vocabulary
    ==========================  ============================================================================

    Hooks a subclass may override (defaults find things through transformers' own accessors, so a family whose
    LM sits at ``language_model``, ``text_model`` or ``decoder`` needs none of them):

    ==========================  ============================================================================
    ``keep_language(vlm)``      the base text model inside the VLM (built on the meta device; only it is read
                                from the checkpoint). Default: ``vlm.get_decoder()``
    ``language_config(config)`` the text model's config. Default: ``config.get_text_config(decoder=True)``
    ==========================  ============================================================================

    Set by ``__init__`` for the subclass to read: ``options`` (``LanguageOptions``), ``config`` (the whole VLM
    config), ``text_config``, ``lm`` (the text model), ``hidden_size``, ``tokenizer``, ``image_start_id``
    (``None`` when no token is appended), ``pad_id``.

    With no weights to load (``config`` only, or ``load_weights: false``) the text model is
    ``AutoModel.from_config(text_config)``, the class ``keep_language`` returns in every transformers VLM.
    The tokenizer is ``tokenizer``, else ``pretrained``'s; with neither, building fails: a random-weight model
    names ``tokenizer: byte-level`` (vgt's byte tokenizer, to which the image-start token is added so the family's
    prompt layout is kept) or a tokenizer folder.
    """

    model_class: ClassVar[type[PreTrainedModel]]
    config_class: ClassVar[type[PretrainedConfig]]
    default_image_start: ClassVar[str | None] = None

    def __init__(self, options: LanguageOptions):
        super().__init__()
        self.options = options
        self.config = resolve_config(options, self.config_class)
        self.text_config = self.language_config(self.config)
        self.text_config._attn_implementation = options.attn_implementation
        if options.pretrained is not None and options.load_weights:
            # only the language model is built and read (no vision tower, no LM head)
            self.lm = load_part(self.model_class, self.config, self.keep_language, options)
        else:  # the text model is a transformers model of its own: built directly from its config
            self.lm = AutoModel.from_config(
                self.text_config,
                attn_implementation=options.attn_implementation,
                dtype=torch_dtype(options.dtype) or torch.float32,
            )
        self.hidden_size = self.text_config.hidden_size
        self._cache_keyword = _cache_keyword(self.lm)  # once: forward runs on every decoding step
        start = options.image_start_token or self.default_image_start
        self.tokenizer = self._load_tokenizer(options, start)
        self.image_start_id = self.tokenizer.get_vocab().get(start) if start else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Captions repeat across steps (a dataset's epochs; a toy world's few dozen): the chat template took 8 % of a
        # tiny model's training step, so each prompt's ids are kept (bounded; cleared when full).
        self._prompt_ids: dict[tuple[str, int | None], list[int]] = {}
        embedded = self.lm.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > embedded:
            raise ValueError(
                f"the tokenizer ({options.tokenizer or options.pretrained}) has {len(self.tokenizer)} tokens but the "
                f"language model embeds only {embedded}: raise text_config.vocab_size to at least "
                f"{len(self.tokenizer)}, or name a tokenizer that fits"
            )

    # -- per-family hooks ---------------------------------------------------------------------------------------

    def keep_language(self, vlm: nn.Module) -> nn.Module:
        """The base text model of the VLM (built on the meta device: only this part gets weights); the same class
        ``AutoModel.from_config(text_config)`` builds. transformers' ``get_decoder`` knows where each family keeps
        it (``language_model``, ``text_model``, ...)."""
        lm = vlm.get_decoder()
        if lm is vlm or not isinstance(lm, PreTrainedModel):
            raise TypeError(
                f"{type(self).__name__}: transformers' get_decoder() finds no language model in "
                f"{type(vlm).__name__}: override keep_language(vlm) to return it"
            )
        return lm

    def language_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """The text model's config inside the VLM's (``text_config`` in every family transformers ships)."""
        return config.get_text_config(decoder=True)

    # -- shared -------------------------------------------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LM's layers in the backward pass (transformers' own switch, non-reentrant)."""
        checkpoint_transformer(self.lm)

    def _load_tokenizer(self, options: LanguageOptions, image_start: str | None) -> Any:
        source = options.tokenizer or options.pretrained
        if source is None:
            raise ValueError(
                f"{type(self).__name__}: no tokenizer: set the backbone option `tokenizer` to a hub id or folder, or "
                f"to `{BYTE_LEVEL}` (vgt's {BYTE_LEVEL_SIZE}-token byte tokenizer, for random-weight models)"
            )
        if source == BYTE_LEVEL:
            from vgt_adapters.tokenizers import byte_level_tokenizer

            return byte_level_tokenizer([image_start] if image_start else [])
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
        ids = [self._cached_ids(p, max_tokens) for p in prompts]
        length = max(len(i) for i in ids)
        device = self.lm.get_input_embeddings().weight.device
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(ids), length), dtype=torch.long, device=device)
        for row, seq in enumerate(ids):  # left padding: every prompt ends where the image begins
            input_ids[row, length - len(seq) :] = torch.tensor(seq, device=device)
            mask[row, length - len(seq) :] = 1
        return self.lm.get_input_embeddings()(input_ids), mask

    PROMPT_CACHE_SIZE = 65_536

    def _cached_ids(self, prompt: str, max_tokens: int | None) -> list[int]:
        key = (prompt, max_tokens)
        ids = self._prompt_ids.get(key)
        if ids is None:
            if len(self._prompt_ids) >= self.PROMPT_CACHE_SIZE:
                self._prompt_ids.clear()
            ids = self._prompt_ids[key] = self.token_ids(prompt, max_tokens)
        return ids

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any | None = None,
    ) -> tuple[torch.Tensor, Any | None]:
        if "flash" in str(self.lm.config._attn_implementation):
            check_flash_attention_inputs(attention_mask, position_ids)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_keyword: cache},
        )
        return out.last_hidden_state, next((out[key] for key in ("cache", "past_key_values") if key in out.keys()), None)

    def new_cache(self, max_length: int | None = None) -> DynamicCache | StaticCache:
        """transformers' ``DynamicCache``, or with ``max_length`` its ``StaticCache`` of that many positions."""
        if max_length is None:
            return DynamicCache(config=self.lm.config)
        return StaticCache(config=self.lm.config, max_cache_len=max_length)

    def export(self, folder: Path) -> dict:
        """The tokenizer and the VLM config without its vision tower, so a reload never builds it."""
        self.tokenizer.save_pretrained(folder)
        drop = other_sub_configs(self.config, text_config_name(self.config))
        return export_config(self.config, folder, self.options, drop=drop, tokenizer=".")


def check_flash_attention_inputs(attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
    """Refuse the inputs that transformers' flash-attention path would attend over differently from SDPA, silently.

    Flash attention takes a padding mask only, so a sampler's 4-D mask (MAR's bidirectional image attention) cannot
    reach it. And a batch of one row without padding goes to flash attention with no mask at all: transformers then
    reads position ids that do not count up by one as several sequences packed into one row, and attends within each
    run only (``_is_packed_sequence``). QueryAR's ``position_ids: grid`` gives such ids. SDPA computes both right.
    """
    if attention_mask.dim() != 2:
        raise ConfigError(
            f"attn_implementation flash_attention_2 takes a padding mask only, and this sampler passes a "
            f"{attention_mask.dim()}-D attention mask (MAR's bidirectional image attention is one): set the backbone "
            "option attn_implementation to sdpa"
        )
    if position_ids.dim() == 2 and position_ids.shape[0] == 1 and position_ids.shape[1] > 1 and bool(attention_mask.all()):
        if not bool((position_ids.diff(dim=-1) == 1).all()):
            raise ConfigError(
                "attn_implementation flash_attention_2 with one row: transformers reads position ids that do not "
                "count up by one (QueryAR's position_ids: grid gives such ids) as packed sequences and would attend "
                "within each run only. Set the backbone option attn_implementation to sdpa, or the sampler option "
                "position_ids to sequence"
            )


def _cache_keyword(lm: torch.nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x (the old name goes in 5.40): pass the KV
    cache under whichever name this version's model takes."""
    return "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"
