"""Text -> images with a trained VGT model: a VGT-AE and a generator in one folder.

    pipe = VGTPipeline.from_pretrained("runs/ar/model")
    images = pipe(["a photo of a red circle"], tokens_per_step=4, guidance_scale=3.0, seed=0)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.config import GenerationConfig
from vgt_core.generator import VGTGenerator, image_draws
from vgt_core.serialization import atomic_folder


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1] ``(B, 3, H, W)`` -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class VGTPipeline:
    """A VGT-AE and a generator; ``__call__`` turns prompts into PIL images."""

    def __init__(self, autoencoder: VGTAutoencoder, generator: VGTGenerator, defaults: GenerationConfig | None = None):
        self.autoencoder = autoencoder.eval()
        self.generator = generator.eval()
        self.defaults = defaults or GenerationConfig()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> VGTPipeline:
        """Load ``folder/autoencoder`` and ``folder/generator`` (a ``vgt train-ar`` run folder works too)."""
        folder = Path(folder)
        if not (folder / "generator").exists() and (folder / "model" / "generator").exists():
            folder = folder / "model"
        defaults = None
        if (folder / "generation.json").exists():
            from vgt_core.config import load_json_model

            defaults = load_json_model(GenerationConfig, folder / "generation.json")
        return cls(
            VGTAutoencoder.from_pretrained(folder / "autoencoder", map_location=device),
            VGTGenerator.from_pretrained(folder / "generator", map_location=device),
            defaults,
        )

    def save_pretrained(self, folder: str | os.PathLike, *, generator_state: dict[str, torch.Tensor] | None = None) -> None:
        """The pipeline folder; ``generator_state`` replaces the generator's own state dict (the gathered weights
        of a sharded FSDP / ZeRO-3 run, whose module holds only its shard)."""
        with atomic_folder(folder, kind="vgt-pipeline") as tmp:
            for name, model, state in (("autoencoder", self.autoencoder, None), ("generator", self.generator, generator_state)):
                (tmp / name).mkdir()
                model.write_into(tmp / name, state=state)
            (tmp / "generation.json").write_text(self.defaults.model_dump_json(indent=2))

    def to(self, device: str | torch.device) -> VGTPipeline:
        self.autoencoder.to(device)
        self.generator.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        *,
        batch_size: int = 16,
        progress: bool = True,
        output_type: str = "pil",
        **settings: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate one image per prompt. ``settings`` are ``GenerationConfig`` fields (tokens_per_step,
        guidance_scale, guidance_schedule, num_sampling_steps, solver, temperature, order, seed, ...). Prompt
        ``i`` draws from its own generator seeded from ``seed + i``: its image does not depend on ``batch_size``
        or on the other prompts, and equals that prompt alone with ``seed + i``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        config = GenerationConfig.model_validate({**self.defaults.model_dump(), **settings})
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        grid = self.autoencoder.grid
        images = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
            chunk = prompts[start : start + batch_size]
            draws = image_draws(seed, start, len(chunk))  # prompt i: seed + i, whatever the batch
            latents = self.generator.generate(chunk, grid, config, generator=draws)
            images.append(self.autoencoder.decode(latents.to(next(self.autoencoder.parameters()).dtype)))
        out = torch.cat(images)
        return to_pil(out) if output_type == "pil" else out
