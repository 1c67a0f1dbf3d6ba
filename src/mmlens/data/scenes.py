"""Synthetic scenes: textured shapes on noise backgrounds, with exact masks, rendered in numpy.

Object classes come in look-alike pairs that share a colour *and* a stripe texture fixed in image
coordinates but differ in shape ("red_circle" vs "red_square"), so a patch inside an object has
the same statistics for both classes and only the outline (context from other patches) tells
them apart. Backgrounds are smooth, desaturated value noise (class 0); shapes are painted back to
front, so occlusion is exact and the mask is the class of the topmost shape at each pixel.
Every example is a pure function of (seed, split, index), so ids name the same image for any n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from datasets import Dataset, List, Value

from ..errors import InputError
from .build import build_dataset, check_count, fingerprint
from .resize import MIN_IMAGE_SIZE
from .schema import (
    IGNORE_INDEX,
    SegmentationInfo,
    png_bytes,
    present_classes,
    segmentation_features,
)

# Saturated colours: their chromaticities are far apart and far from the grey-brown backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "blue": (45, 85, 215),
    "green": (40, 170, 60),
    "yellow": (225, 200, 40),
    "purple": (140, 60, 200),
    "orange": (235, 130, 25),
    "cyan": (30, 190, 200),
    "magenta": (210, 50, 170),
}
# One pair of shapes per colour; each shape recurs under several colours so that colour and
# shape are separate factors for questions ("how many circles?").
SHAPE_PAIRS = (
    ("circle", "square"),
    ("triangle", "ring"),
    ("square", "triangle"),
    ("ring", "circle"),
    ("cross", "hexagon"),
    ("hexagon", "triangle"),
    ("circle", "cross"),
    ("ring", "square"),
)
SHAPES = ("circle", "square", "triangle", "ring", "cross", "hexagon")
MAX_K = 2 * len(COLOURS)
SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}
_SPLIT_ALIASES = {"val": "validation"}
# Mixed into every seed so these streams never coincide with other numpy users of the same seed.
_STREAM_SALT = 0x5CE7E5

# Stripe texture: brightness factor in [1 - _STRIPE_DEPTH, 1]; period in px at 64 px images.
_STRIPE_DEPTH = 0.28
_BASE_PERIOD = 4.5
_RING_INNER = 0.5  # hole radius / outer radius
_CROSS_HALF_WIDTH = 0.36  # arm half-width / radius
_GRAIN = 3.0  # std of the luminance grain shared by the whole image


@dataclass(frozen=True)
class SceneClass:
    id: int
    name: str
    colour: str
    shape: str


def scene_classes(k: int = 8) -> tuple[SceneClass, ...]:
    """The ``k`` object classes (ids 1..k); classes 2i+1 and 2i+2 share colour and texture."""
    if not 1 <= k <= MAX_K:
        raise InputError(f"k (object classes) must be in 1..{MAX_K}, got {k}")
    classes = []
    for index in range(k):
        colour = list(COLOURS)[index // 2]
        shape = SHAPE_PAIRS[index // 2][index % 2]
        classes.append(SceneClass(index + 1, f"{colour}_{shape}", colour, shape))
    return tuple(classes)


def scene_class_names(k: int = 8) -> tuple[str, ...]:
    """``("background", *object class names)``: k + 1 names, index = mask value."""
    return ("background", *(cls.name for cls in scene_classes(k)))


def lookalike_pairs(k: int = 8) -> list[tuple[str, str]]:
    """Class-name pairs that share colour and texture (only their shapes differ)."""
    classes = scene_classes(k)
    return [(a.name, b.name) for a, b in zip(classes[::2], classes[1::2])]


def _texture(colour: str) -> tuple[float, float]:
    """(stripe angle in radians, period at 64 px) of a colour; shared by both classes of a pair."""
    index = list(COLOURS).index(colour)
    return math.radians((25 + 55 * index) % 180), _BASE_PERIOD + 1.5 * (index % 3)


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres, so a shape covers a pixel iff it covers the pixel's middle.
    coords = np.arange(size, dtype=np.float32) + 0.5
    xs, ys = np.meshgrid(coords, coords)  # X (columns), Y (rows)
    xs.flags.writeable = ys.flags.writeable = False  # shared through the cache
    return xs, ys


@lru_cache(maxsize=16)
def _upsampler(size: int, cells: int) -> np.ndarray:
    """(size, cells + 1) smoothstep interpolation weights from a coarse lattice to pixels."""
    position = (np.arange(size) + 0.5) / size * cells
    left = np.minimum(position.astype(int), cells - 1)
    t = position - left
    t = t * t * (3 - 2 * t)  # smoothstep hides the lattice's straight-line artefacts
    weights = np.zeros((size, cells + 1), dtype=np.float32)
    weights[np.arange(size), left] = 1 - t
    weights[np.arange(size), left + 1] = t
    return weights


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    weights = _upsampler(size, cells)
    lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
    return weights @ lattice @ weights.T


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two-octave value noise blending two desaturated colours (float32 HxWx3)."""
    field = 0.65 * _value_noise(rng, size, 3) + 0.35 * _value_noise(rng, size, 8)
    greys = rng.uniform(60, 200, size=(2, 1))
    # A small tint keeps backgrounds varied yet far less saturated than any object colour.
    colours = (greys + rng.uniform(-16, 16, size=(2, 3))).astype(np.float32)
    return colours[0] + (colours[1] - colours[0]) * field[..., None]


def shape_mask(
    shape: str, cx: float, cy: float, radius: float, angle: float, size: int
) -> np.ndarray:
    """Boolean HxW mask of a shape inscribed in the circle (cx, cy, radius), rotated by angle."""
    xs, ys = _pixel_grid(size)
    dx, dy = xs - cx, ys - cy
    if shape in ("circle", "ring"):
        d2 = dx * dx + dy * dy
        inside = d2 <= radius * radius
        if shape == "ring":
            inside &= d2 >= (_RING_INNER * radius) ** 2
        return inside
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * dx + sin * dy, cos * dy - sin * dx
    if shape == "square":
        half = radius / math.sqrt(2)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":
        # Equilateral: three half-planes at the inradius, i.e. half the circumradius.
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            normal = math.pi / 3 + 2 * math.pi * k / 3
            inside &= u * math.cos(normal) + v * math.sin(normal) <= radius / 2
        return inside
    if shape == "hexagon":
        apothem = radius * math.cos(math.pi / 6)
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            normal = math.pi / 6 + math.pi * k / 3
            inside &= np.abs(u * math.cos(normal) + v * math.sin(normal)) <= apothem
        return inside
    if shape == "cross":
        # Arm length chosen so the arm corners stay on the circumscribed circle.
        half_width = _CROSS_HALF_WIDTH * radius
        reach = math.sqrt(radius * radius - half_width * half_width)
        au, av = np.abs(u), np.abs(v)
        return ((au <= reach) & (av <= half_width)) | ((av <= reach) & (au <= half_width))
    raise InputError(f"unknown shape {shape!r}; known: {SHAPES}")


def render_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    *,
    k: int = 8,
    min_objects: int = 1,
    max_objects: int = 4,
    size_range: tuple[float, float] = (0.14, 0.31),
    min_visibility: float = 0.3,
    max_tries: int = 20,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Render one scene: (image uint8 HxWx3, mask uint8 HxW, objects back to front).

    ``size_range`` bounds the radius as a fraction of the image side (9-20 px at 64 px). A
    placement that would leave an earlier object less than ``min_visibility`` visible is
    redrawn (up to ``max_tries`` times, then the object is dropped), so every listed object can
    be seen. Each object dict has class_id, class_name, colour, shape, x, y (centre in [0, 1]),
    size (radius / side), angle (degrees), visibility (visible / drawn pixels) and area
    (visible pixels / image pixels).
    """
    if not 1 <= min_objects <= max_objects <= 127:  # 127: owner indices are int8
        raise InputError(
            f"need 1 <= min_objects <= max_objects <= 127, got {min_objects}, {max_objects}"
        )
    if not 0 < size_range[0] <= size_range[1] <= 0.5:
        raise InputError(f"size_range must satisfy 0 < low <= high <= 0.5, got {size_range}")
    classes = scene_classes(k)
    size = image_size
    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int8)  # index of the topmost object per pixel
    placed: list[tuple[SceneClass, float, float, float, float, np.ndarray]] = []
    count = int(rng.integers(min_objects, max_objects + 1))
    areas = np.zeros(count)  # drawn pixels per placed object
    for _ in range(count):
        # The class is drawn once per object so rejected placements cannot bias class balance.
        cls = classes[int(rng.integers(len(classes)))]
        for _ in range(max_tries):
            radius = rng.uniform(*size_range) * size
            cx, cy = rng.uniform(radius, size - radius, size=2)
            angle = rng.uniform(0, 2 * math.pi)
            drawn = shape_mask(cls.shape, cx, cy, radius, angle, size)
            area = int(drawn.sum())
            if area == 0:
                continue
            if placed:
                counts = np.bincount(np.where(drawn, len(placed), owner).ravel() + 1,
                                     minlength=len(placed) + 2)  # fmt: skip
                if np.any(counts[1 : len(placed) + 1] < min_visibility * areas[: len(placed)]):
                    continue
            owner[drawn] = len(placed)
            areas[len(placed)] = area
            placed.append((cls, cx, cy, radius, angle, drawn))
            break

    xs, ys = _pixel_grid(size)
    for cls, _, _, _, _, drawn in placed:
        stripe_angle, period = _texture(cls.colour)
        period *= size / 64
        phase = rng.uniform(0, 2 * math.pi)
        along = xs[drawn] * math.cos(stripe_angle) + ys[drawn] * math.sin(stripe_angle)
        shade = 1 - _STRIPE_DEPTH * (0.5 + 0.5 * np.sin(2 * math.pi * along / period + phase))
        brightness = rng.uniform(0.88, 1.04)
        image[drawn] = np.asarray(COLOURS[cls.colour], np.float32) * (brightness * shade)[:, None]
    image += rng.normal(0, _GRAIN, size=(size, size, 1)).astype(np.float32)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)

    lut = np.zeros(len(placed) + 1, dtype=np.uint8)  # owner -1 (index 0 here) is background
    lut[1:] = [p[0].id for p in placed]
    mask = lut[owner.astype(np.intp) + 1]
    visible = np.bincount(owner.ravel().astype(np.intp) + 1, minlength=len(placed) + 1)[1:]
    objects = [
        {
            "class_id": cls.id,
            "class_name": cls.name,
            "colour": cls.colour,
            "shape": cls.shape,
            "x": float(cx / size),
            "y": float(cy / size),
            "size": float(radius / size),
            "angle": float(math.degrees(angle)),
            "visibility": float(visible[j] / areas[j]),
            "area": float(visible[j] / (size * size)),
        }
        for j, (cls, cx, cy, radius, angle, drawn) in enumerate(placed)
    ]
    return image, mask, objects


OBJECT_FEATURES = {
    "class_id": Value("int32"),
    "class_name": Value("string"),
    "colour": Value("string"),
    "shape": Value("string"),
    "x": Value("float32"),
    "y": Value("float32"),
    "size": Value("float32"),
    "angle": Value("float32"),
    "visibility": Value("float32"),
    "area": Value("float32"),
}


_RENDER_OPTIONS = ("min_objects", "max_objects", "size_range", "min_visibility", "max_tries")


def canonical_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLIT_STREAMS:
        raise InputError(f"scenes split must be one of {sorted(SPLIT_STREAMS)}, got {split!r}")
    return split


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example ``index``: independent of every other (seed, split, index)."""
    entropy = [_STREAM_SALT, seed, SPLIT_STREAMS[canonical_split(split)], index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def scene_id(seed: int, split: str, index: int) -> str:
    return f"scenes/{canonical_split(split)}/seed{seed}/{index:06d}"


def load_scenes(
    *,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    image_size: int = 64,
    k: int = 8,
    start: int = 0,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    **render_kwargs,
) -> Dataset:
    """Examples ``start .. start + n - 1`` (n defaults to 1000) of a split's scene stream."""
    split = canonical_split(split)
    check_count(n)
    n = 1000 if n is None else n
    if start < 0 or seed < 0:
        raise InputError(f"start and seed must be non-negative, got {start}, {seed}")
    if image_size < MIN_IMAGE_SIZE:
        raise InputError(f"image_size must be at least {MIN_IMAGE_SIZE} px, got {image_size}")
    scene_classes(k)  # validate k before any work
    unknown = set(render_kwargs) - set(_RENDER_OPTIONS)
    if unknown:
        # Raised here: inside the generator datasets would wrap it in DatasetGenerationError.
        raise TypeError(f"unknown scenes options {sorted(unknown)}; known: {_RENDER_OPTIONS}")
    info = SegmentationInfo("scenes", scene_class_names(k), IGNORE_INDEX, image_size)
    indices = list(range(start, start + n))
    key = fingerprint("scenes", split, seed, image_size, k, start, n, sorted(render_kwargs.items()))
    return build_dataset(
        _generate,
        gen_kwargs={"indices": indices, "seed": seed, "split": split, "image_size": image_size,
                    "k": k, "render_kwargs": render_kwargs},  # fmt: skip
        features=segmentation_features(info.class_names, {"objects": List(OBJECT_FEATURES)}),
        info=info,
        fingerprint=key,
        split=split,
        cache_dir=cache_dir,
        num_proc=num_proc if num_proc and num_proc > 1 and n > 1 else None,
    )


def _generate(indices, seed, split, image_size, k, render_kwargs):
    num_classes = k + 1
    for index in indices:
        image, mask, objects = render_scene(
            scene_rng(seed, split, index), image_size, k=k, **render_kwargs
        )
        yield {
            "id": scene_id(seed, split, index),
            "image": png_bytes(image),
            "mask": png_bytes(mask),
            "classes": present_classes(mask, num_classes),
            "objects": objects,
        }
