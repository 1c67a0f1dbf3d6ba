"""ImageGeometry against real (in-memory) Hugging Face image processors: the PIL backend always,
the torchvision backend too where torchvision is installed (every parity test then runs on both)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from mmlens.model.images.preprocess import ImageGeometry
from mmlens.testing import build_word_tokenizer

# Non-square crops with odd margins so that a height/width swap or an off-by-one offset shows.
PROCESSORS = {
    "clip": lambda **kw: CLIPImageProcessorPil(
        size={"shortest_edge": 24}, crop_size={"height": 21, "width": 19}, **kw
    ),
    # crop larger than the resized image along one axis: transformers pads with zeros there
    "clip_overhang": lambda **kw: CLIPImageProcessorPil(
        size={"shortest_edge": 24}, crop_size={"height": 29, "width": 30}, **kw
    ),
    "llava_pad": lambda **kw: LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 28, "width": 31}, **kw
    ),
    "siglip": lambda **kw: SiglipImageProcessorPil(size={"height": 30, "width": 26}, **kw),
    "clip_nocrop": lambda **kw: CLIPImageProcessorPil(size={"shortest_edge": 24}, do_center_crop=False, **kw),
}
try:  # most research environments have torchvision; transformers then defaults to its backend
    import torchvision  # noqa: F401
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor
    from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

    HAS_TORCHVISION = True
    PROCESSORS.update({
        "clip_tv": lambda **kw: CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 21, "width": 19}, **kw),
        "clip_overhang_tv": lambda **kw: CLIPImageProcessor(
            size={"shortest_edge": 24}, crop_size={"height": 29, "width": 30}, **kw
        ),
        "llava_pad_tv": lambda **kw: LlavaImageProcessor(
            do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 28, "width": 31}, **kw
        ),
        "siglip_tv": lambda **kw: SiglipImageProcessor(size={"height": 30, "width": 26}, **kw),
    })
except ImportError:
    HAS_TORCHVISION = False
# 64x41 pads by an odd 23 columns; 30x41 has a shortest-edge long side of 24 * 41 / 30 = 32.8
SIZES = [(37, 53), (64, 41), (45, 45), (30, 41)]


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def block_labels(height: int, width: int, seed: int, big: bool = False) -> np.ndarray:
    """A label map of 4 x 5 axis-aligned rectangles at random cut points, all labels distinct."""
    grid = (4, 5)
    rng = np.random.default_rng(seed)
    row_cuts = np.sort(rng.choice(np.arange(4, height - 4), grid[0] - 1, replace=False))
    col_cuts = np.sort(rng.choice(np.arange(4, width - 4), grid[1] - 1, replace=False))
    rows = np.searchsorted(row_cuts, np.arange(height), side="right")
    cols = np.searchsorted(col_cuts, np.arange(width), side="right")
    labels = grid[1] * rows[:, None] + cols[None, :] + 1  # 1..grid[0] * grid[1]
    if big:
        return (labels * 37).astype(np.int64)  # up to 740: needs the int32 path
    return labels.astype(np.uint8)


def palette_for(labels: np.ndarray, avoid: list[tuple[int, int, int]], seed: int) -> dict[int, np.ndarray]:
    """Well separated random colours, one per label, far from the padding colours."""
    rng = np.random.default_rng(seed)
    colours: list[np.ndarray] = []
    while len(colours) < len(np.unique(labels)):
        c = rng.integers(0, 256, 3)
        if all(np.abs(c - np.asarray(o)).max() > 60 for o in colours + [np.asarray(a) for a in avoid]):
            colours.append(c)
    return {int(label): colour.astype(np.uint8) for label, colour in zip(np.unique(labels), colours)}


def paint(labels: np.ndarray, palette: dict[int, np.ndarray]) -> Image.Image:
    image = np.zeros(labels.shape + (3,), dtype=np.uint8)
    for label, colour in palette.items():
        image[labels == label] = colour
    return Image.fromarray(image)


# ----------------------------------------------------------------------------- pixel values


@pytest.mark.parametrize("name", PROCESSORS)
def test_pixel_values_match_processor(name):
    processor = PROCESSORS[name]()
    geometry = ImageGeometry.from_processor(processor)
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    for image in images:
        expected = processor(images=image, return_tensors="pt").pixel_values
        got = geometry.to_pixel_values(image)
        assert got.dtype == torch.float32
        assert got.shape == expected.shape == (1, 3, *geometry.output_size(image.height, image.width))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if geometry.crop is not None or isinstance(geometry.resize, tuple):
        batch = geometry.to_pixel_values(images)
        expected = processor(images=images, return_tensors="pt").pixel_values
        torch.testing.assert_close(batch, expected, atol=1e-5, rtol=0)
    else:  # shortest edge without crop: sizes differ, nothing to stack
        with pytest.raises(ValueError, match="different sizes"):
            geometry.to_pixel_values(images)


def test_pixel_values_are_bit_exact():
    """Same numpy ops in the same order (float64 rescale, float32 normalize): no rounding drift."""
    processor = PROCESSORS["llava_pad"]()
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    expected = processor(images=images, return_tensors="pt").pixel_values
    assert torch.equal(ImageGeometry.from_processor(processor).to_pixel_values(images), expected)


@pytest.mark.parametrize("name", ["clip", "llava_pad"])
def test_pixel_values_for_other_input_kinds(name):
    processor = PROCESSORS[name]()
    geometry = ImageGeometry.from_processor(processor)
    rgb = random_image(37, 53, seed=7)
    array = np.array(rgb)
    rng = np.random.default_rng(8)
    rgba = Image.fromarray(np.concatenate([array, rng.integers(0, 256, (37, 53, 1), dtype=np.uint8)], axis=-1))
    inputs = [
        array,  # numpy (H, W, 3)
        torch.from_numpy(array).permute(2, 0, 1).contiguous(),  # torch (3, H, W)
        rgba,  # alpha composited on white
        rgb.convert("L"),  # grayscale -> RGB
    ]
    for image in inputs:
        expected = processor(images=image, return_tensors="pt").pixel_values
        torch.testing.assert_close(geometry.to_pixel_values(image), expected, atol=1e-5, rtol=0)
    assert np.array_equal(np.asarray(geometry.transform_image(array)), np.asarray(geometry.transform_image(rgb)))


def test_resample_filter_is_read():
    processor = PROCESSORS["siglip"](resample=Image.Resampling.BILINEAR)
    geometry = ImageGeometry.from_processor(processor)
    assert geometry.resample == Image.Resampling.BILINEAR
    image = random_image(64, 40, seed=3)
    torch.testing.assert_close(
        geometry.to_pixel_values(image), processor(images=image, return_tensors="pt").pixel_values, atol=1e-5, rtol=0
    )


def test_from_processor_reads_fields_and_unwraps_processor():
    image_processor = PROCESSORS["llava_pad"]()
    geometry = ImageGeometry.from_processor(image_processor)
    assert geometry.pad_to_square and geometry.resize == 32 and geometry.crop == (28, 31)
    assert geometry.resample == Image.Resampling.BICUBIC
    assert geometry.pad_color == tuple(int(m * 255) for m in image_processor.image_mean)
    assert ImageGeometry.from_processor(PROCESSORS["siglip"]()).resize == (30, 26)
    assert ImageGeometry.from_processor(PROCESSORS["siglip"]()).crop is None
    wrapper = LlavaProcessor(image_processor=image_processor, tokenizer=build_word_tokenizer())
    assert ImageGeometry.from_processor(wrapper) == geometry


@pytest.mark.parametrize(
    ("name", "height", "width", "expected"),
    [
        ("clip", 37, 53, (21, 19)),
        ("siglip", 37, 53, (30, 26)),
        ("llava_pad", 64, 40, (28, 31)),
    ],
)
def test_output_size(name, height, width, expected):
    geometry = ImageGeometry.from_processor(PROCESSORS[name]())
    assert geometry.output_size(height, width) == expected
    assert geometry.transform_image(random_image(height, width, 0)).size == expected[::-1]
    assert geometry.transform_mask(np.zeros((height, width), np.uint8)).shape == expected


def test_output_size_without_crop_keeps_aspect_like_transformers():
    geometry = ImageGeometry(resize=24)
    # transformers truncates the long edge: int(24 * 53 / 37) = 34
    assert geometry.output_size(37, 53) == (24, 34)
    assert geometry.output_size(53, 37) == (34, 24)
    assert geometry.output_size(30, 41) == (24, 32)  # 32.8 -> 32
    assert ImageGeometry(pad_to_square=True, resize=24).output_size(37, 53) == (24, 24)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", PROCESSORS)
@pytest.mark.parametrize(("height", "width"), SIZES[:2])
@pytest.mark.parametrize("big", [False, True])
def test_mask_matches_processor_geometry_exactly(name, height, width, big):
    """A colour-coded label image run through the processor with NEAREST resampling and no
    rescale/normalize must decode to exactly transform_mask (padding and overhang -> 255)."""
    labels = block_labels(height, width, seed=height + width, big=big)
    reference = PROCESSORS[name](resample=Image.Resampling.NEAREST, do_rescale=False, do_normalize=False)
    geometry = ImageGeometry.from_processor(PROCESSORS[name]())
    pad_colours = [(0, 0, 0), geometry.pad_color]
    palette = palette_for(labels, pad_colours, seed=1)
    pixels = reference(images=paint(labels, palette), return_tensors="pt").pixel_values[0]
    pixels = pixels.permute(1, 2, 0).numpy().astype(np.int64)

    decoded = np.full(pixels.shape[:2], -1, dtype=np.int64)
    for label, colour in palette.items():
        decoded[(pixels == colour).all(-1)] = label
    for colour in pad_colours:
        decoded[(pixels == np.asarray(colour)).all(-1)] = 255
    assert (decoded >= 0).all(), "processor output has colours outside the palette"

    mask = geometry.transform_mask(labels)
    assert mask.dtype == (np.int64 if big else np.uint8)
    assert mask.shape == decoded.shape
    np.testing.assert_array_equal(mask, decoded)


@pytest.mark.parametrize("name", PROCESSORS)
@pytest.mark.parametrize(("height", "width"), SIZES[:2])
def test_mask_labels_sit_under_their_colours(name, height, width):
    """With the real (bicubic) processor, interior mask pixels carry the label whose colour the
    processed image shows there, and padding shows the padding colour."""
    # 3 x 3 blocks with at least 12 source pixels per side, so each keeps an interior
    rng = np.random.default_rng(3 * height + width)
    cuts = lambda n: np.array([rng.integers(12, n // 2 - 2), rng.integers(n // 2 + 2, n - 12)])  # noqa: E731
    rows = np.searchsorted(cuts(height), np.arange(height), side="right")
    cols = np.searchsorted(cuts(width), np.arange(width), side="right")
    labels = (3 * rows[:, None] + cols[None, :] + 1).astype(np.uint8)
    processor = PROCESSORS[name]()
    geometry = ImageGeometry.from_processor(processor)
    palette = palette_for(labels, [(0, 0, 0), geometry.pad_color], seed=2)
    image, mask = geometry.transform_pair(paint(labels, palette), labels)
    pixels = np.asarray(image).astype(np.int64)
    assert mask.shape == pixels.shape[:2] == processor(images=image, return_tensors="pt").pixel_values.shape[-2:]

    # pixels whose 5x5 neighbourhood has a single mask value are away from borders
    r = 2
    padded = np.pad(mask.astype(np.int64), r, mode="constant", constant_values=-1)
    interior = np.ones(mask.shape, dtype=bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            interior &= padded[r + dy : r + dy + mask.shape[0], r + dx : r + dx + mask.shape[1]] == mask
    checked = set()
    for label, colour in palette.items():
        where = interior & (mask == label)
        if where.any():
            assert np.abs(pixels[where] - colour).max() <= 3, f"label {label}"
            checked.add(label)
    # not vacuous: every block that shows at least 7 x 7 pixels has an interior and was checked
    big_blocks = {
        label for label in palette if (mask == label).any(0).sum() >= 7 and (mask == label).any(1).sum() >= 7
    }
    assert len(checked) >= 3 and big_blocks <= checked
    # padding interior shows black (crop overhang) or LLaVA's background colour
    pad = interior & (mask == 255)
    if pad.any():
        options = np.stack([np.zeros(3), np.asarray(geometry.pad_color)])
        distance = np.abs(pixels[pad][:, None, :] - options[None]).max(-1).min(-1)
        assert distance.max() <= 3


def test_llava_pad_to_square_bands_are_ignore():
    geometry = ImageGeometry.from_processor(PROCESSORS["llava_pad"]())
    wide = geometry.transform_mask(np.zeros((37, 53), np.uint8))  # padded above and below
    assert (wide[0] == 255).all() and (wide[-1] == 255).all()
    assert not (wide[wide.shape[0] // 2] == 255).any()
    assert not (wide == 255).all(axis=0).any()
    tall = geometry.transform_mask(np.zeros((64, 40), np.uint8))  # padded left and right
    assert (tall[:, 0] == 255).all() and (tall[:, -1] == 255).all()
    assert not (tall[:, tall.shape[1] // 2] == 255).any()


def test_crop_overhang_is_ignore_and_black():
    geometry = ImageGeometry.from_processor(PROCESSORS["clip_overhang"]())
    # 37x53 -> resize (24, 34) -> crop (29, 30): 3 rows above, 2 below, columns 2..31 kept
    mask = geometry.transform_mask(np.zeros((37, 53), np.uint8))
    assert (mask[:3] == 255).all() and (mask[-2:] == 255).all()
    assert (mask[3:-2] == 0).all()
    image = np.asarray(geometry.transform_image(Image.new("RGB", (53, 37), (200, 150, 100))))
    assert (image[:3] == 0).all() and (image[-2:] == 0).all()
    assert (image[3:-2] == (200, 150, 100)).all()


def test_mask_input_kinds_and_dtypes():
    geometry = ImageGeometry.from_processor(PROCESSORS["llava_pad"]())
    labels = block_labels(37, 53, seed=0)
    reference = geometry.transform_mask(labels)
    np.testing.assert_array_equal(geometry.transform_mask(torch.from_numpy(labels)), reference)
    np.testing.assert_array_equal(geometry.transform_mask(Image.fromarray(labels)), reference)
    as_int64 = geometry.transform_mask(labels.astype(np.int64))
    assert as_int64.dtype == np.int64
    np.testing.assert_array_equal(as_int64, reference)
    negative = geometry.transform_mask(labels, ignore_index=-1)  # does not fit uint8 -> int64
    assert negative.dtype == np.int64
    np.testing.assert_array_equal(negative == -1, reference == 255)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("mask_hw", [(53, 37), (36, 53)])
def test_transform_pair_size_mismatch(mask_hw):
    geometry = ImageGeometry.from_processor(PROCESSORS["clip"]())
    with pytest.raises(ValueError) as info:
        geometry.transform_pair(random_image(37, 53, 0), np.zeros(mask_hw, np.uint8))
    message = str(info.value)
    assert "(37, 53)" in message and str(mask_hw) in message
    assert "nearest" in message


@pytest.mark.parametrize(
    "bad",
    [
        "image.png",
        None,
        [[0, 1], [2, 3]],
        np.zeros((5, 6), np.uint8),  # 2-D
        np.zeros((5, 6, 4), np.uint8),  # 4 channels
        np.zeros((5, 6, 3), np.float32),  # float
        torch.zeros(5, 6, 3, dtype=torch.uint8),  # channels-last torch
        torch.zeros(3, 5, 6, dtype=torch.float32),  # float torch
    ],
)
def test_unsupported_image_types(bad):
    geometry = ImageGeometry.from_processor(PROCESSORS["siglip"]())
    for call in (geometry.transform_image, geometry.to_pixel_values, geometry.image_size):
        with pytest.raises(TypeError) as info:
            call(bad)
        message = str(info.value)
        assert type(bad).__name__ in message and "PIL.Image.Image" in message


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((5, 6), np.float32),
        np.zeros((5, 6, 1), np.uint8),
        Image.new("RGB", (6, 5)),
        [[0, 1], [2, 3]],
    ],
)
def test_unsupported_mask_types(bad):
    geometry = ImageGeometry.from_processor(PROCESSORS["siglip"]())
    with pytest.raises(TypeError, match="mask must be"):
        geometry.transform_mask(bad)


class _CustomResize(CLIPImageProcessorPil):
    def resize(self, image, size, resample=None, **kwargs):  # pragma: no cover - never called
        return image


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: CLIPImageProcessorPil(size={"shortest_edge": 20, "longest_edge": 40}), "size="),
        (lambda: CLIPImageProcessorPil(do_pad=True), "do_pad"),
        (lambda: CLIPImageProcessorPil(crop_size={"shortest_edge": 20}), "crop_size"),
        (lambda: _CustomResize(), "resize()"),
    ],
)
def test_unsupported_processor_options(make, fragment):
    processor = make()
    with pytest.raises(ValueError) as info:
        ImageGeometry.from_processor(processor)
    assert type(processor).__name__ in str(info.value) and fragment in str(info.value)


def test_from_processor_rejects_non_processors():
    with pytest.raises(TypeError, match="image processor"):
        ImageGeometry.from_processor(object())


def test_crop_offsets_follow_each_backend_on_an_odd_overhang():
    """transformers pads a too-small image before cropping: ceil(overhang / 2) first with the PIL
    backend, floor(overhang / 2) with torchvision (tvF.pad then int((h - crop) / 2))."""
    from mmlens.model.images.preprocess import _crop_offsets

    assert _crop_offsets(24, 24, (29, 30), "pil") == (-3, -3)
    assert _crop_offsets(24, 24, (29, 30), "torchvision") == (-2, -3)
    assert _crop_offsets(40, 33, (21, 19), "pil") == _crop_offsets(40, 33, (21, 19), "torchvision") == (9, 7)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed here (mmlens never needs it); "
                    "the torchvision-backed processors are tested wherever it is")
def test_a_torchvision_backed_model_runs_a_probe_study():
    from mmlens import HookedMLLM
    from mmlens.data import load_segmentation
    from mmlens.probing import probe_sweep

    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    assert type(model.processor.image_processor).__name__ == "CLIPImageProcessor"  # the torchvision default
    assert model.geometry.backend == "torchvision"
    scenes = load_segmentation("scenes", split="validation", n=8)
    image = scenes[0]["image"]
    torch.testing.assert_close(model.geometry.to_pixel_values(image), model.prepare([image], "").pixel_values,
                               atol=1e-5, rtol=0)
    sweep = probe_sweep(model, scenes, sites=["adapter.hook_out"], probe="ridge", n_boot=1000, progress=False)
    assert 0 < sweep.table.miou.iloc[0] <= 1
