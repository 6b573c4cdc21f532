"""A tiny VLM that *understands* the shapes world before it is tuned to generate (VGT starts from a VLM
trained for understanding).

The real transformers InternVL3 classes at toy size learn to describe shapes images — image ->
"a photo of a red circle , a blue square and a green triangle" (objects left to right) — through their own
forward: image tokens scattered into the prompt, cross-entropy on the description. Understanding is scored on
held-out images, teacher-forced: token accuracy, the share of descriptions right in every word, and the accuracy
on the shape words and on the colour words alone (what the generator will have to draw).
The trained folder (weights + word-level tokenizer) is then the ``pretrained`` of both the ``internvl3``
encoder and the ``internvl3-lm`` backbone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import InternVLConfig, InternVLForConditionalGeneration

from vgt_adapters.hf_vision import IMAGENET_MEAN, IMAGENET_STD
from vgt_core.training.muon import MuonWithAdamW, hidden_matrices
from vgt_core.training.run import cosine_with_warmup
from vgt_shapes import ShapesOptions
from vgt_shapes.tokenizer import build_tokenizer
from vgt_shapes.world import COLORS, SHAPES, ShapesSample

IMAGE_TOKEN = "<IMG_CONTEXT>"
INSTRUCTION = "describe the image ."


def describe(sample: ShapesSample) -> str:
    """The canonical description of a sample: every object, left to right, with its colour."""
    parts = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}" for o in sorted(sample.objects, key=lambda o: o.x)]
    listed = parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
    return f"a photo of {listed}"


def pixels(images: list[Any]) -> torch.Tensor:
    """PIL images -> InternVL's normalised pixel values (what the ``internvl3`` encoder plugin computes)."""
    x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images]).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class CaptionBatcher:
    """Shapes samples -> InternVL chat inputs whose answer (the description) is the labelled part."""

    def __init__(self, tokenizer, image_tokens: int):
        self.tok = tokenizer
        content = "<img>" + IMAGE_TOKEN * image_tokens + "</img> " + INSTRUCTION
        self.prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=False))
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, samples: list[ShapesSample]) -> dict[str, torch.Tensor]:
        answers = [self.tok(describe(s))["input_ids"] + [self.end] for s in samples]
        length = len(self.prompt) + max(map(len, answers))
        ids = torch.full((len(samples), length), self.tok.pad_token_id)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        start = len(self.prompt)
        for i, answer in enumerate(answers):
            row = self.prompt + answer
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, start : len(row)] = torch.tensor(answer)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels([s.image for s in samples])}


@torch.no_grad()
def understanding_accuracy(
    model: InternVLForConditionalGeneration, batches: list[dict], words: dict[str, list[int]] | None = None
) -> dict[str, float]:
    """Teacher-forced accuracy on the description tokens, the share of descriptions right in full, and for each
    group of ``words`` (name -> token ids) the accuracy on the tokens of that group (``<name>_accuracy``)."""
    model.eval()
    words = {name: torch.tensor(ids) for name, ids in (words or {}).items()}
    right = total = exact = count = 0
    group_right, group_total = dict.fromkeys(words, 0), dict.fromkeys(words, 0)
    for batch in batches:
        logits = model(**batch).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        scored = labels != -100
        hit = (logits.argmax(-1) == labels) & scored
        right += int(hit.sum())
        total += int(scored.sum())
        exact += int((hit | ~scored).all(1).sum())
        count += labels.shape[0]
        for name, ids in words.items():
            in_group = torch.isin(labels, ids)
            group_right[name] += int(hit[in_group].sum())
            group_total[name] += int(in_group.sum())
    model.train()
    groups = {f"{name}_accuracy": group_right[name] / max(group_total[name], 1) for name in words}
    return {"token_accuracy": right / total, "exact_match": exact / count, **groups}


def pretrain_understanding(
    config: dict,
    out_dir: str | Path,
    *,
    world: ShapesOptions,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    eval_images: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a tiny InternVL3 to describe images of ``world`` (its size and objects; ``seed`` seeds the model and
    the training images); save it with its tokenizer to ``out_dir``; return held-out accuracy before and after
    (overall, on shape words, on colour words), the losses and the time taken."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = {**config, "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    config["text_config"] = {**config["text_config"], "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    model = InternVLForConditionalGeneration(InternVLConfig.from_dict(config))
    vision = model.config.vision_config
    grid = int(world.image_size // vision.patch_size[0] * model.config.downsample_ratio)
    batcher = CaptionBatcher(tokenizer, grid * grid)
    train, held_out = world.world(seed), world.world(seed + 10_000)
    eval_batches = [batcher([held_out.sample(i) for i in range(j, min(j + 128, eval_images))]) for j in range(0, eval_images, 128)]
    words = {"shape": tokenizer.convert_tokens_to_ids(list(SHAPES)), "color": tokenizer.convert_tokens_to_ids(list(COLORS))}
    before = understanding_accuracy(model, eval_batches, words)

    # Muon for the VLM's linear layers, AdamW for the rest (vgt's train_ar.optimizer=muon): 500 steps named shapes
    # as well as 800 of AdamW with a one-cycle schedule (docs/results/2026-shapes-tuning-log.md)
    hidden = hidden_matrices(model, outputs=[model.get_output_embeddings()])
    optimizer = MuonWithAdamW(model.named_parameters(), hidden, lr=lr, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    schedule = cosine_with_warmup(optimizer, max(1, steps // 20), steps, 0.0)
    rng = np.random.default_rng(seed)
    losses, start = [], time.time()
    model.train()
    for _ in tqdm(range(steps), desc="VLM understanding", disable=not progress):
        loss = model(**batcher([train.sample(int(i)) for i in rng.integers(0, 2**31, batch_size)])).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    after = understanding_accuracy(model, eval_batches, words)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"before": before, "after": after, "losses": losses, "seconds": time.time() - start}
