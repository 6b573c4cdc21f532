"""The options of vgt's adapters (pydantic only, no torch): what a preset may set for a transformers or diffusers
component. Plugins register these classes; validating a preset (``vgt presets show``) imports them and nothing
heavier. The adapters that build the components re-export them from their old places."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from vgt_core.registry import Options

Dtype = Literal["float32", "bfloat16", "float16"]


class PretrainedOptions(Options):
    """Where a component's weights come from."""

    pretrained: str | None = Field(None, description="hub id or local folder (from_pretrained)")
    config: dict[str, Any] | None = Field(
        None, description="a transformers/diffusers config as a dict: the architecture when `pretrained` is unset"
    )
    load_weights: bool = Field(True, description="false: build the architecture only (weights come from elsewhere)")
    revision: str | None = None
    dtype: Dtype | None = Field(None, description="dtype of the weights: float32 (the default), bfloat16 or float16")

    @model_validator(mode="before")
    @classmethod
    def _moved_options(cls, data: Any) -> Any:
        """``gradient_checkpointing`` was a component option; the training config's switch now covers every
        component. ``false`` (what older saved folders hold) is dropped; ``true`` says where the switch went."""
        if isinstance(data, dict) and "gradient_checkpointing" in data:
            data = dict(data)
            if data.pop("gradient_checkpointing"):
                raise ValueError(
                    "gradient_checkpointing is no longer a component option: set train_ae.stage1/stage2."
                    "gradient_checkpointing or train_ar.gradient_checkpointing in the preset (one switch for every component)"
                )
        return data


class VisionOptions(PretrainedOptions):
    image_size: int | None = Field(None, description="input side in pixels (default: the model's own)")
    image_mean: tuple[float, float, float] | None = Field(None, description="default: the model's preprocessor")
    image_std: tuple[float, float, float] | None = None


class LanguageOptions(PretrainedOptions):
    tokenizer: str | None = Field(
        None,
        description="hub id or folder of the tokenizer (default: `pretrained`'s), or `byte-level`: vgt's 260-token "
        "byte tokenizer plus the image-start token, for random-weight models (text_config.vocab_size must cover it)",
    )
    image_start_token: str | None = Field(
        None, description="appended to every prompt when it is one token of the vocabulary (default: the family's)"
    )
    use_chat_template: bool = Field(True, description="wrap prompts in the tokenizer's chat template as a user turn")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel of the language model"
    )


class DiffusersOptions(PretrainedOptions):
    subfolder: str | None = Field(None, description="subfolder of `pretrained` holding the autoencoder")


class DiffusersDecoderOptions(DiffusersOptions):
    latent_channels: int = Field(32, gt=0)
    resize: Literal["bilinear", "bicubic", "nearest"] = "bilinear"


class DiffusersEncoderOptions(DiffusersOptions):
    image_size: int = Field(512, gt=0, description="input side in pixels; a multiple of the encoder's downsampling")
