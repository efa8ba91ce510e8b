"""Every random draw of training goes through here, from one generator or from an ensemble's members' generators.

A run draws from a ``torch.Generator``. An ensemble of ``S`` runs (docs/methods.md §9) draws from
``MemberGenerators``: member ``k`` draws what the run with its seed alone would, from its own generator, and the
draws are stacked on the member axis. Noise is drawn for row tensors, shape ``(..., B, x)``, which in an ensemble
are ``(..., S, B, x)``: the member axis is third from the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Where the member axis sits, from the end: in a row tensor (..., S, B, x) and in per-row values (..., S, B).
ROWS, VALUES = -3, -2
MEMBER_AXIS = ROWS


class MemberGenerators:
    """One ``torch.Generator`` per ensemble member, seeded with the members' seeds, on one device.

    ``get_state`` and ``set_state`` take the stacked ``(S, n)`` states, as a ``torch.Generator`` takes its own.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def get_state(self) -> torch.Tensor:
        return torch.stack([generator.get_state() for generator in self.generators])

    def set_state(self, states: torch.Tensor) -> None:
        for generator, state in zip(self.generators, states, strict=True):
            generator.set_state(state.clone())  # a row view of the stack would not do (``Generator.set_state``)


Generator = torch.Generator | MemberGenerators | None


def _draw(
    fill: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor],
    shape,
    generator: Generator,
    like: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A tensor of ``shape`` on ``like``'s device and in ``dtype`` (default ``like``'s) filled in place by
    ``fill(tensor, generator)``; for ``MemberGenerators`` each member's draw, of the member's shape (``shape``
    without its member axis, which must be there), is filled from its own generator, as the run alone draws it, and
    the draws are stacked on the member axis."""
    shape = tuple(shape)
    options = {"device": like.device, "dtype": like.dtype if dtype is None else dtype}
    if not isinstance(generator, MemberGenerators):
        return fill(torch.empty(shape, **options), generator)
    axis = len(shape) + MEMBER_AXIS
    if axis < 0 or shape[axis] != len(generator):
        raise ValueError(f"an ensemble of {len(generator)} draws row tensors (..., S, B, x), not of shape {shape}")
    draws = torch.empty((len(generator), *shape[:axis], *shape[axis + 1 :]), **options)
    for draw, member in zip(draws, generator.generators, strict=True):
        fill(draw, member)
    return draws.movedim(0, axis).contiguous()


def gaussian(shape, generator: Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws of ``shape`` on ``like``'s device and dtype."""
    return _draw(lambda tensor, g: tensor.normal_(generator=g), shape, generator, like)


def uniform(shape, generator: Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform draws in [0, 1) of ``shape`` on ``like``'s device and dtype."""
    return _draw(lambda tensor, g: tensor.uniform_(generator=g), shape, generator, like)


def signs(shape, generator: Generator, like: torch.Tensor) -> torch.Tensor:
    """Rademacher draws (±1 with probability ½ each) of ``shape`` on ``like``'s device and dtype."""
    bits = _draw(lambda tensor, g: tensor.random_(0, 2, generator=g), shape, generator, like, dtype=torch.int64)
    return (2 * bits - 1).to(like.dtype)
