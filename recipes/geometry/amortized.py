"""What a prompt-amortized generator is: one network that turns a prompt's text embedding into a 3D field.

ScaleDreamer trains one generator over a whole prompt corpus. The amortized system
(:class:`recipes.system.amortized.AmortizedTextTo3D`) asks each generator for the field of one prompt,
:meth:`AmortizedGenerator.condition`, and renders that field with the NeuS renderer
(:class:`recipes.render.neus.NeuSRenderer`) exactly as it renders an :class:`~recipes.geometry.sdf.ImplicitSDF`.
The two protocols below are that contract: any generator (Hyper-iNGP, :mod:`recipes.geometry.hyper_ingp`; the
3DConv-net) implements :class:`AmortizedGenerator`, and what its ``condition`` returns implements
:class:`ConditionedField`.

The renderer reaches the field through :class:`FieldSlot`, a parameter-free module that stands in the renderer's
``geometry`` place and forwards to the field of the prompt being rendered (``with slot.holding(field): …``): the
renderer, its material and background are built once, and the per-prompt fields never become submodules (so
they are not in the state dict; the generator's parameters are, once, under the scene).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from recipes.geometry.nerf import FieldOutput


@runtime_checkable
class ConditionedField(Protocol):
    """One prompt's signed-distance field: a drop-in for :class:`~recipes.geometry.sdf.ImplicitSDF` wherever the
    NeuS renderer and the mesh export use their geometry.

    Attributes:
        radius: half the side of the scene box ``[-radius, radius]^3`` the field lives in.
    """

    radius: float

    def __call__(self, points: Tensor, with_normal: bool = True) -> FieldOutput:
        """At points ``[N, 3]``: ``features [N, F]`` (before the material's activation), ``sdf [N]``,
        ``sdf_gradient [N, 3]`` (for the eikonal loss) and unit outward ``normal [N, 3]``; differentiable with
        respect to the generator's parameters."""
        ...

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance ``[...]`` at points ``[..., 3]`` (negative inside)."""
        ...

    def update_step(self, step: int) -> None:
        """Set what is a pure function of the optimizer step (progressive hash-grid levels, normal step sizes)."""
        ...


@runtime_checkable
class AmortizedGenerator(Protocol):
    """A text-conditioned 3D generator (an ``nn.Module``; its parameters are the trained state).

    Attributes:
        embedding_dim: the size ``D`` of the pooled text embedding it is conditioned on.
        noise_dim: the size of its Gaussian noise input, 0 when it takes none (Hyper-iNGP: 0, 3DConv-net: 64).
        radius: the scene box of every field it generates (the renderer's box).
    """

    embedding_dim: int
    noise_dim: int
    radius: float

    def condition(
        self, embedding: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> ConditionedField:
        """The field of one prompt: ``embedding [D]`` (and ``noise [noise_dim]`` when ``noise_dim > 0``);
        ``generator`` is the batch item's own random stream, for any randomness inside the generator (the
        3DConv-net's random per-voxel noise), so that a split batch draws what the whole batch draws."""
        ...

    def update_step(self, step: int) -> None:
        """Set what is a pure function of the optimizer step, for every field it generates."""
        ...


class FieldSlot(nn.Module):
    """The renderer's ``geometry``: forwards to the field set by :meth:`holding`, and has no state of its own.

    Args:
        radius: the scene box (the generator's ``radius``).
    """

    def __init__(self, radius: float) -> None:
        super().__init__()
        self.radius = radius
        self._field: list[ConditionedField] = []  # a list, so nn.Module never registers the field

    @contextmanager
    def holding(self, field: ConditionedField) -> Iterator[ConditionedField]:
        """Render ``field`` through this slot for the duration of the block."""
        if field.radius != self.radius:
            raise ValueError(
                f"the generated field lives in radius {field.radius} but the renderer was built for {self.radius}; "
                "give the generator and the scene the same radius"
            )
        self._field.append(field)
        try:
            yield field
        finally:
            self._field.pop()

    @property
    def field(self) -> ConditionedField:
        """The field being rendered."""
        if not self._field:
            raise RuntimeError(
                "no prompt's field is being rendered: render through AmortizedScene.render_field, which holds one"
            )
        return self._field[-1]

    def forward(self, points: Tensor, with_normal: bool = True) -> FieldOutput:
        return self.field(points, with_normal=with_normal)

    def sdf(self, points: Tensor) -> Tensor:
        return self.field.sdf(points)


__all__ = ["AmortizedGenerator", "ConditionedField", "FieldSlot"]
