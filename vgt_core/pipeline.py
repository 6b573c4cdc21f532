"""Text -> images with a trained VGT model: a VGT-AE and a generator in one folder.

    pipe = VGTPipeline.from_pretrained("runs/ar/model", device="cuda")     # bf16 weights on a bf16-capable GPU
    images = pipe(["a photo of a red circle"], tokens_per_step=4, guidance_scale=3.0, seed=0)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.config import GenerationConfig
from vgt_core.generator import VGTGenerator, image_draws
from vgt_core.randomness import SampleDraws
from vgt_core.serialization import atomic_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeName = Literal["float32", "bfloat16", "float16"]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1] ``(B, 3, H, W)`` -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype; ``None`` is bfloat16 on a CUDA device that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype}: allowed {', '.join(DTYPES)}")
        return dtype
    if dtype is None:
        cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating-point parameters to ``dtype``; buffers (normalisation constants, rotary frequencies, running
    statistics) stay as they are, in float32, as transformers keeps them in a bf16 model. Shared parameters stay
    shared."""
    done: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            if id(param) not in done:
                done[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
            sub._parameters[name] = done[id(param)]
    return module


class VGTPipeline:
    """A VGT-AE and a generator; ``__call__`` turns prompts into PIL images.

    With ``dtype`` other than float32 the weights are stored in that dtype and generation runs under
    ``torch.autocast`` in it (buffers stay float32; the image comes out of the decoder as float)."""

    def __init__(
        self,
        autoencoder: VGTAutoencoder,
        generator: VGTGenerator,
        defaults: GenerationConfig | None = None,
        dtype: DtypeName | torch.dtype | None = None,
    ):
        self.autoencoder = autoencoder.eval()
        self.generator = generator.eval()
        self.defaults = defaults or GenerationConfig()
        self.dtype = resolve_dtype(dtype, "cpu") if dtype is not None else next(generator.parameters()).dtype
        cast_parameters(self.autoencoder, self.dtype)
        cast_parameters(self.generator, self.dtype)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: DtypeName | torch.dtype | None = None,
    ) -> VGTPipeline:
        """Load ``folder/autoencoder`` and ``folder/generator`` (a ``vgt train-ar`` run folder works too) onto
        ``device`` with weights in ``dtype``: float32, bfloat16 or float16; ``None`` (the default) is bfloat16 on a
        CUDA device that supports it, float32 elsewhere. Weights are cast on the CPU, so the device only ever
        holds them in ``dtype``."""
        dtype = resolve_dtype(dtype, device)
        folder = Path(folder)
        if not (folder / "generator").exists() and (folder / "model" / "generator").exists():
            folder = folder / "model"
        if not (folder / "autoencoder").is_dir() or not (folder / "generator").is_dir():
            raise FileNotFoundError(
                f"{folder}: not a vgt pipeline folder (no autoencoder/ and generator/; `vgt train-ar` and "
                "`vgt convert-upstream --ar` write one)"
            )
        defaults = None
        if (folder / "generation.json").exists():
            from vgt_core.config import load_json_model

            defaults = load_json_model(GenerationConfig, folder / "generation.json")
        return cls(
            VGTAutoencoder.from_pretrained(folder / "autoencoder", map_location="cpu"),
            VGTGenerator.from_pretrained(folder / "generator", map_location="cpu"),
            defaults,
            dtype,
        ).to(device)

    def save_pretrained(self, folder: str | os.PathLike, *, generator_state: dict[str, torch.Tensor] | None = None) -> None:
        """The pipeline folder; ``generator_state`` replaces the generator's own state dict (the gathered weights
        of a sharded FSDP / ZeRO-3 run, whose module holds only its shard)."""
        with atomic_folder(folder, kind="vgt-pipeline") as tmp:
            for name, model, state in (("autoencoder", self.autoencoder, None), ("generator", self.generator, generator_state)):
                (tmp / name).mkdir()
                model.write_into(tmp / name, state=state)
            (tmp / "generation.json").write_text(self.defaults.model_dump_json(indent=2))

    def compile(self, **kwargs) -> VGTPipeline:
        """``torch.compile`` the generator's per-step work (``VGTGenerator.compile``: the language model and the flow
        head); the decoder runs once per batch and stays eager. The first batch pays the compilation."""
        self.generator.compile(**kwargs)
        return self

    def to(self, device: str | torch.device) -> VGTPipeline:
        self.autoencoder.to(device)
        self.generator.to(device)
        return self

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision in the weights' dtype (no-op in float32): matmuls in bf16/fp16, reductions in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        device = next(self.generator.parameters()).device
        return torch.autocast(device.type, dtype=self.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        *,
        batch_size: int = 16,
        progress: bool = True,
        output_type: str = "pil",
        seeds: Sequence[int] | None = None,
        **settings: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate one image per prompt. ``settings`` are ``GenerationConfig`` fields (tokens_per_step,
        guidance_scale, guidance_schedule, num_sampling_steps, solver, temperature, order, seed, ...). Prompt
        ``i`` draws from its own generator seeded from ``seed + i``: its image does not depend on ``batch_size``
        or on the other prompts, and equals that prompt alone with ``seed + i``. ``seeds`` (one per prompt) instead
        gives prompt ``i`` the image of that prompt alone with ``seed=seeds[i]``: benchmarks number their images
        themselves, so that an image does not depend on which prompts share its call (shards, resumed runs)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt")
        config = GenerationConfig.model_validate({**self.defaults.model_dump(), **settings})
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        grid = self.autoencoder.grid
        images = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
            chunk = prompts[start : start + batch_size]
            if seeds is None:
                draws = image_draws(seed, start, len(chunk))  # prompt i: seed + i, whatever the batch
            else:
                draws = SampleDraws([g for s in seeds[start : start + len(chunk)] for g in image_draws(s, 0, 1).generators])
            with self._autocast():
                latents = self.generator.generate(chunk, grid, config, generator=draws)
                images.append(self.autoencoder.decode(latents).float())
        out = torch.cat(images)
        return to_pil(out) if output_type == "pil" else out
