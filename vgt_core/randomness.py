"""Random draws of training, made per sample.

A distributed run splits each global batch across processes and micro-batches. If the random numbers of training
(prompt dropout, flow timesteps and noise, QueryAR's order, MAR's masks, the AE's latent noise, random crops) came
from one stream per process, a sample's draws would depend on which process and micro-batch it landed in, so a run
on 8 GPUs would not compute what the same run on 1 GPU computes, and could not resume on another GPU count.

``SampleDraws`` gives each sample its own generator seeded from ``(seed, stream, step, position in the global
batch)``: every draw for a sample is the same wherever it is computed. ``GlobalDraws`` has the same methods on
torch's global RNG, for code run outside a training loop (tests, one-off losses).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def sample_seed(seed: int, stream: str, step: int, position: int | str) -> int:
    """A 63-bit seed for one sample's draws; a hash, so nearby (step, position) give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{step}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generator(seed: int, stream: str, step: int, position: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, stream, step, position))


class Draws:
    """Random tensors whose first dimension is indexed by ``owner``: row ``r`` belongs to sample ``owner[r]``.

    ``owner`` lets flattened layouts (all tokens of a batch as rows, repeated ``batch_mul`` times) draw per sample.
    """

    def rand(self, owner: torch.Tensor, *shape: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def randn(self, owner: torch.Tensor, *shape: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def per_sample(self, count: int) -> torch.Tensor:
        """The ``owner`` of a ``(count, ...)`` tensor with one row per sample."""
        return torch.arange(count)


class GlobalDraws(Draws):
    """Draws from torch's global RNG (vectorised; what a single-process loop outside training uses)."""

    def rand(self, owner, *shape, device="cpu", dtype=torch.float32):
        return torch.rand(len(owner), *shape, device=device, dtype=dtype)

    def randn(self, owner, *shape, device="cpu", dtype=torch.float32):
        return torch.randn(len(owner), *shape, device=device, dtype=dtype)


class SampleDraws(Draws):
    """One CPU generator per sample; rows of a sample are drawn from it in row order, then moved to ``device``.

    Drawing on the CPU keeps the numbers identical on every device; the cost is one small draw per sample.
    """

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def for_batch(cls, seed: int, stream: str, step: int, positions: Sequence[int]) -> SampleDraws:
        """Generators for the samples at ``positions`` of global batch ``step``."""
        return cls([sample_generator(seed, stream, step, int(p)) for p in positions])

    def subset(self, rows: slice | Sequence[int]) -> SampleDraws:
        """The draws of some samples (a micro-batch), keeping each sample's own generator."""
        picked = self.generators[rows] if isinstance(rows, slice) else [self.generators[i] for i in rows]
        return SampleDraws(picked)

    def __len__(self) -> int:
        return len(self.generators)

    def _draw(self, fn, owner: torch.Tensor, shape, device, dtype) -> torch.Tensor:
        owner = owner.cpu()
        if owner.numel() and int(owner.max()) >= len(self.generators):
            raise IndexError(f"draw for sample {int(owner.max())} of a batch of {len(self.generators)} samples")
        counts = torch.bincount(owner, minlength=len(self.generators)).tolist()
        parts = [fn(n, *shape, generator=g, dtype=dtype) for g, n in zip(self.generators, counts) if n]
        drawn = torch.cat(parts) if parts else torch.empty(0, *shape, dtype=dtype)
        order = torch.sort(owner, stable=True).indices  # each sample's rows in row order, samples in turn
        out = torch.empty_like(drawn)
        out[order] = drawn
        if torch.device(device).type == "cuda":
            # from pinned memory the copy is queued behind the GPU's work; from pageable memory it would wait for that
            # work to finish, a host-device sync at every draw of training steps and generation passes
            return out.pin_memory().to(device, non_blocking=True)
        return out.to(device)

    def rand(self, owner, *shape, device="cpu", dtype=torch.float32):
        return self._draw(torch.rand, owner, shape, device, dtype)

    def randn(self, owner, *shape, device="cpu", dtype=torch.float32):
        return self._draw(torch.randn, owner, shape, device, dtype)
