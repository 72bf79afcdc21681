"""K captioned procedural objects: the weight-free prompt corpus of amortized text-to-3D.

Each object is a :class:`~recipes.data.procedural.ProceduralObject` of one of six shapes (a sphere, a box, a tall
box, two spheres, a sphere on a box, three spheres) in one of eight colours with stripes of another, and its
caption says which (``"a red sphere with yellow stripes"``). Object ``i`` is a fixed function of ``i``: the first
K objects of :func:`procedural_objects` are the same in every run, and consecutive objects differ in both shape and
colour. Each has its own view-conditioned closed-form prior (:class:`recipes.guidance.multi_object.MultiObjectPrior`)
and its own ground truth for novel-view PSNR.
"""

from __future__ import annotations

from typing import NamedTuple

from recipes.data.procedural import ProceduralObject, StripedBox, StripedSphere, Vec3

COLOURS: dict[str, Vec3] = {
    "red": (0.85, 0.15, 0.12),
    "blue": (0.15, 0.30, 0.85),
    "green": (0.10, 0.65, 0.25),
    "yellow": (0.95, 0.85, 0.15),
    "orange": (0.95, 0.55, 0.10),
    "purple": (0.45, 0.15, 0.55),
    "cream": (0.98, 0.92, 0.80),
    "black": (0.10, 0.10, 0.12),
}
SHAPES = ("sphere", "box", "tall box", "pair of spheres", "sphere on a box", "cluster of three spheres")
MAX_OBJECTS = len(SHAPES) * len(COLOURS)
_STRIDE = 7  # coprime to MAX_OBJECTS: object i → pair (7·i mod 48) visits every (shape, colour) pair once


class CaptionedObject(NamedTuple):
    """A procedural object and the caption that asks for it."""

    caption: str
    object: ProceduralObject


def _shape(kind: str, colour: Vec3, stripe: Vec3) -> ProceduralObject:
    z, x = (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)

    def sphere(center: Vec3, radius: float, axis: Vec3 = z) -> StripedSphere:
        return StripedSphere(center, radius, colour, stripe, axis, stripes_per_unit=5.0)

    def box(center: Vec3, half: Vec3, yaw: float) -> StripedBox:
        return StripedBox(center, half, colour, stripe, yaw_deg=yaw, stripe_axis=x, stripes_per_unit=5.0)

    if kind == "sphere":
        return ProceduralObject(spheres=(sphere((0.0, 0.0, 0.0), 0.55),))
    if kind == "box":
        return ProceduralObject(boxes=(box((0.0, 0.0, 0.0), (0.42, 0.30, 0.30), 25.0),))
    if kind == "tall box":
        return ProceduralObject(boxes=(box((0.0, 0.0, 0.0), (0.22, 0.22, 0.60), 10.0),))
    if kind == "pair of spheres":
        return ProceduralObject(spheres=(sphere((0.3, -0.2, 0.0), 0.35), sphere((-0.35, 0.25, 0.1), 0.28, x)))
    if kind == "sphere on a box":
        return ProceduralObject(
            spheres=(sphere((0.0, 0.0, 0.28), 0.30),),
            boxes=(box((0.0, 0.0, -0.30), (0.40, 0.40, 0.20), 35.0),),
        )
    return ProceduralObject(
        spheres=(
            sphere((0.35, 0.0, -0.15), 0.27),
            sphere((-0.2, 0.32, -0.1), 0.25, x),
            sphere((-0.1, -0.3, 0.3), 0.23),
        )
    )


def procedural_object(index: int) -> CaptionedObject:
    """Object ``index`` (0 ≤ index < :data:`MAX_OBJECTS`) and its caption."""
    if not 0 <= index < MAX_OBJECTS:
        raise ValueError(f"there are {MAX_OBJECTS} procedural objects; object {index} does not exist")
    pair = (_STRIDE * index) % MAX_OBJECTS
    kind = SHAPES[pair % len(SHAPES)]
    names = list(COLOURS)
    colour = names[pair // len(SHAPES)]
    stripe = names[(pair // len(SHAPES) + 3) % len(names)]
    article = "an" if colour[0] in "aeiou" else "a"
    caption = f"{article} {colour} {kind} with {stripe} stripes"
    return CaptionedObject(caption, _shape(kind, COLOURS[colour], COLOURS[stripe]))


def procedural_objects(count: int) -> list[CaptionedObject]:
    """The first ``count`` objects (distinct captions); at most :data:`MAX_OBJECTS`."""
    if not 1 <= count <= MAX_OBJECTS:
        raise ValueError(f"procedural_objects takes 1 to {MAX_OBJECTS} objects, got {count}")
    return [procedural_object(i) for i in range(count)]


def object_of_caption(caption: str) -> CaptionedObject:
    """The procedural object a caption asks for.

    Raises:
        ValueError: ``caption`` is no procedural object's caption.
    """
    index = _CAPTIONS.get(caption)
    if index is None:
        raise ValueError(
            f"{caption!r} is not the caption of a procedural object (e.g. {procedural_object(0).caption!r}); the "
            "closed-form prior knows only those: train on model.corpus.procedural_objects K, or a corpus whose train "
            "prompts are such captions, or use a text model (model.guidance.model stable-diffusion)"
        )
    return procedural_object(index)


_CAPTIONS = {procedural_object(i).caption: i for i in range(MAX_OBJECTS)}

__all__ = ["MAX_OBJECTS", "CaptionedObject", "object_of_caption", "procedural_object", "procedural_objects"]
