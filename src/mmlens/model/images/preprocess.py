"""Shared image / label-mask geometry read from a Hugging Face image processor.

`ImageGeometry` reads the pad-to-square, resize, center-crop, rescale and normalize settings of
an image processor, PIL- or torchvision-backed, and replays them step by step (same size rule,
integer rounding, filter and crop offsets of that backend), so `to_pixel_values` reproduces the
processor's `pixel_values`. The torchvision backend is replayed with torchvision itself, which a
torchvision-backed processor implies is installed; mmlens never needs it otherwise.
Label masks go through the identical geometry with nearest-neighbour resampling, and every
output pixel that does not come from the source image (padding, crop overhang) is `ignore_index`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float, Shaped
from PIL import Image

__all__ = ["ImageGeometry", "ImageInput", "MaskGeometry", "MaskInput"]

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor]
"""A PIL image, a uint8 numpy array (H, W, 3) or a uint8 torch tensor (3, H, W)."""
MaskInput = Union[np.ndarray, torch.Tensor, Image.Image]
"""An integer / bool (H, W) numpy array or torch tensor, or a single-band PIL image (L, P, I, 1)."""


@runtime_checkable
class MaskGeometry(Protocol):
    """What `Architecture.mask_geometry` returns and `HookedMLLM.geometry` is: how label masks follow
    a processor's pixels onto the layout's canvas (`ImageGeometry` for the stock resize / pad / crop;
    a family with its own resize or tiling has its own class)."""

    def image_size(self, image: ImageInput) -> tuple[int, int]:
        """(height, width) of an accepted image input, validating its type."""
        ...

    def transform_mask(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "H W"]:
        """The mask on the layout's canvas; pixels from no source pixel are `ignore_index`."""
        ...


_ACCEPTED_IMAGES = (
    "a PIL.Image.Image, a uint8 numpy array of shape (H, W, 3) or a uint8 torch tensor of shape (3, H, W)"
)
_ACCEPTED_MASKS = (
    "an integer or bool numpy array / torch tensor of shape (H, W), "
    "or a single-band PIL image (mode L, P, I, I;16 or 1)"
)
_INT32 = np.iinfo(np.int32)

# Methods whose stock implementations ImageGeometry mirrors. A processor class that overrides any
# of them (LLaVA-NeXT's any-res tiling, custom resizes, ...) is refused rather than approximated.
_MIRRORED_METHODS = (
    "__call__",
    "preprocess",
    "_standardize_kwargs",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "_prepare_images_structure",
    "process_image",
    "convert_to_rgb",
    "resize",
    "center_crop",
    "rescale",
    "normalize",
    "_preprocess",
)


def _describe(obj: Any) -> str:
    """Type, plus shape and dtype for arrays, for error messages."""
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return f"{type(obj).__module__}.{type(obj).__name__} with shape {tuple(obj.shape)} and dtype {obj.dtype}"
    if isinstance(obj, Image.Image):
        return f"PIL image of mode {obj.mode!r} and size (width, height) = {obj.size}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _as_triple(value: Any, name: str, cls_name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{cls_name}: {name} must have 3 entries (RGB), got {values}")
    return values  # type: ignore[return-value]


def _hw_from_size_dict(size: Any) -> dict[str, int]:
    """The non-None entries of a SizeDict / dict as a plain dict."""
    if size is None:
        return {}
    return {k: v for k, v in dict(size).items() if v is not None}


def _pad_square(array: np.ndarray, fill: Any) -> np.ndarray:
    """LLaVA's pad_to_square on a channels-last (H, W[, C]) array: centred, floor offset."""
    height, width = array.shape[:2]
    if height == width:
        return array
    side = max(height, width)
    out = np.empty((side, side) + array.shape[2:], dtype=array.dtype)
    out[...] = fill
    if width > height:
        top = (side - height) // 2
        out[top : top + height] = array
    else:
        left = (side - width) // 2
        out[:, left : left + width] = array
    return out


def _crop_offsets(height: int, width: int, crop: tuple[int, int], backend: str = "pil") -> tuple[int, int]:
    """Top-left corner of transformers' center_crop in source coordinates (may be negative).

    The PIL backend pads a too-small image with ceil((crop - size) / 2) before it, which puts
    source pixel 0 at output offset -floor((size - crop) / 2): the plain crop's formula. The
    torchvision backend pads floor((crop - size) / 2) before it, one pixel less when the
    overhang is odd.
    """
    def offset(size: int, target: int) -> int:
        if backend == "torchvision" and target > size:
            return -((target - size) // 2)
        return (size - target) // 2

    return offset(height, crop[0]), offset(width, crop[1])


def _center_crop(array: np.ndarray, crop: tuple[int, int], fill: Any, backend: str = "pil") -> np.ndarray:
    """transformers' center_crop on a channels-last array; overhang is filled with `fill`."""
    height, width = array.shape[:2]
    top, left = _crop_offsets(height, width, crop, backend)
    out = np.empty(crop + array.shape[2:], dtype=array.dtype)
    out[...] = fill
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + crop[0], height), min(left + crop[1], width)
    if src_bottom > src_top and src_right > src_left:
        out[src_top - top : src_bottom - top, src_left - left : src_right - left] = array[
            src_top:src_bottom, src_left:src_right
        ]
    return out


# What a family passes as `stock_when_off`: per image processor class name, the options that, all
# off, make the listed overridden methods run the stock pipeline.
StockWhenOff = Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]


def _stock_when_off(image_processor: Any, stock_when_off: StockWhenOff) -> tuple[str, ...]:
    """The overridden methods of `image_processor` that run the stock pipeline as it is set."""
    options, methods = stock_when_off.get(type(image_processor).__name__, ((), ()))
    return () if any(getattr(image_processor, o, None) for o in options) else methods


def _llava_processor_class(backend: str) -> type:
    """LLaVA's image processor (pad-to-square before resizing) for one backend; the torchvision
    one is imported only when a torchvision-backed processor is in use (it imports torchvision)."""
    if backend == "torchvision":
        from transformers.models.llava.image_processing_llava import LlavaImageProcessor

        return LlavaImageProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil


def _torchvision_resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """The torchvision backend's resize of a uint8 (H, W, 3) array: tvF.resize with antialias and
    the PIL filter's torchvision counterpart, exactly as transformers calls it."""
    from torchvision.transforms.v2 import functional as tvF
    from transformers.image_utils import pil_torch_interpolation_mapping

    chw = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a writable copy
    out = tvF.resize(chw, list(size), interpolation=pil_torch_interpolation_mapping[resample], antialias=True)
    return out.permute(1, 2, 0).numpy()


def _torchvision_rescale_and_normalize(chw: np.ndarray, geometry: "ImageGeometry") -> torch.Tensor:
    """TorchvisionBackend.rescale_and_normalize: rescale folded into float32 mean and std."""
    x = torch.from_numpy(chw)
    if geometry.do_normalize:
        mean, std = torch.tensor(geometry.image_mean), torch.tensor(geometry.image_std)
        if geometry.do_rescale:
            mean, std = mean * (1.0 / geometry.rescale_factor), std * (1.0 / geometry.rescale_factor)
        return (x.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    if geometry.do_rescale:
        return x * geometry.rescale_factor
    return x.to(torch.float32)


def _shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): int() truncation."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


@dataclass(frozen=True)
class ImageGeometry:
    """The geometry and intensity pipeline of a Hugging Face image processor (PIL or torchvision backend).

    Steps, in the processor's order: RGB conversion (alpha composited on white), LLaVA's
    pad-to-square (background `pad_color`), resize, center crop, rescale, normalize.

    Attributes:
        pad_to_square: LLaVA `do_pad`: pad the short side, centred, before resizing.
        resize: `int` = shortest edge (aspect kept, long edge truncated with `int()`),
            `(height, width)` = exact size, `None` = no resize.
        resample: PIL filter used for the image (masks always use NEAREST).
        crop: center-crop `(height, width)`, or `None`.
        do_rescale / rescale_factor: multiply by the factor (in float64, then cast to float32).
        do_normalize / image_mean / image_std: `(x - mean) / std` per channel, in float32.
        do_convert_rgb: convert non-RGB PIL images to RGB; if False only RGB images are accepted.
        backend: "pil" or "torchvision": whose resize filter and crop offsets are replayed.
    """

    pad_to_square: bool = False
    resize: int | tuple[int, int] | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    crop: tuple[int, int] | None = None
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    do_normalize: bool = False
    do_rescale: bool = True
    do_convert_rgb: bool = True
    backend: str = "pil"

    @staticmethod
    def pixel_steps(image_processor: Any) -> dict[str, Any]:
        """The steps a Hugging Face image processor applies to every pixel (resampling filter,
        rescale, normalisation, RGB conversion) as this class's fields, for geometries whose resize
        rule is the family's own."""
        ip = image_processor
        return dict(resample=int(ip.resample), rescale_factor=ip.rescale_factor, image_mean=tuple(ip.image_mean),
                    image_std=tuple(ip.image_std), do_normalize=bool(ip.do_normalize), do_rescale=bool(ip.do_rescale),
                    do_convert_rgb=bool(ip.do_convert_rgb))

    def __post_init__(self) -> None:
        if self.backend not in ("pil", "torchvision"):
            raise ValueError(f"backend must be 'pil' or 'torchvision', got {self.backend!r}")
        if self.resize is not None:
            if isinstance(self.resize, (int, np.integer)) and not isinstance(self.resize, bool):
                if self.resize <= 0:
                    raise ValueError(f"resize (shortest edge) must be positive, got {self.resize}")
            elif not (
                isinstance(self.resize, tuple) and len(self.resize) == 2 and all(int(s) > 0 for s in self.resize)
            ):
                raise ValueError(
                    f"resize must be None, a positive shortest edge or a (height, width) tuple, got {self.resize!r}"
                )
        if self.crop is not None and not (
            isinstance(self.crop, tuple) and len(self.crop) == 2 and all(int(s) > 0 for s in self.crop)
        ):
            raise ValueError(f"crop must be None or a positive (height, width) tuple, got {self.crop!r}")
        if self.do_normalize and (self.image_mean is None or self.image_std is None):
            raise ValueError("do_normalize=True needs image_mean and image_std")
        if self.do_rescale and self.rescale_factor is None:
            raise ValueError("do_rescale=True needs a rescale_factor")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_processor(cls, image_processor: Any, stock_when_off: StockWhenOff | None = None) -> ImageGeometry:
        """Read the geometry of a PIL-backend image processor (or a processor holding one).

        Supported: any `PilBackend` subclass that keeps the stock pipeline (CLIP, SigLIP, ViT-style
        processors) and `LlavaImageProcessorPil` (whose `do_pad` pads to square before resizing),
        with `size` either `{"shortest_edge"}` or `{"height", "width"}` and `crop_size`
        `{"height", "width"}`. Anything else raises `ValueError` naming the processor class.
        `stock_when_off` names processors whose overrides only add a step that is off by default
        (a family's `mask_geometry` passes its own, e.g. Gemma 3's pan-and-scan): with every
        listed option off, the listed methods count as stock.
        """
        from transformers.image_processing_backends import PilBackend, TorchvisionBackend
        from transformers.image_processing_utils import BaseImageProcessor

        if not isinstance(image_processor, BaseImageProcessor) and hasattr(image_processor, "image_processor"):
            image_processor = image_processor.image_processor
        if not isinstance(image_processor, BaseImageProcessor):
            raise TypeError(
                "from_processor expects a transformers image processor or a processor with an "
                f".image_processor attribute; got {_describe(image_processor)}"
            )
        cls_name = type(image_processor).__name__
        if isinstance(image_processor, TorchvisionBackend):
            backend, stock = "torchvision", TorchvisionBackend
        elif isinstance(image_processor, PilBackend):
            backend, stock = "pil", PilBackend
        else:
            raise ValueError(
                f"{cls_name} is neither a PIL- nor a torchvision-backed image processor; ImageGeometry only "
                "mirrors the stock pipelines of transformers."
            )
        llava = _llava_processor_class(backend)
        proc_type = type(image_processor)
        is_llava = isinstance(image_processor, llava)
        reference = llava if is_llava else stock
        methods = _MIRRORED_METHODS + (("pad_to_square",) if is_llava else ())
        overridden = [name for name in methods if getattr(proc_type, name, None) is not getattr(reference, name, None)
                      and name not in _stock_when_off(image_processor, stock_when_off or {})]
        if overridden:
            raise ValueError(
                f"{cls_name} overrides {', '.join(m + '()' for m in overridden)} of "
                f"{reference.__name__}; ImageGeometry only mirrors the stock pipeline and cannot "
                "reproduce this processor."
            )

        get = lambda name, default=None: getattr(image_processor, name, default)  # noqa: E731
        unsupported: list[str] = []

        do_pad = bool(get("do_pad"))
        if do_pad and not is_llava:
            unsupported.append(
                f"do_pad=True (batch padding to pad_size={get('pad_size')}, bottom/right; only "
                "LLaVA's pad-to-square is supported)"
            )

        resize: int | tuple[int, int] | None = None
        if get("do_resize"):
            size = _hw_from_size_dict(get("size"))
            if set(size) == {"shortest_edge"}:
                resize = int(size["shortest_edge"])
            elif set(size) == {"height", "width"}:
                resize = (int(size["height"]), int(size["width"]))
            else:
                unsupported.append(f"size={size} (only {{'shortest_edge'}} or {{'height', 'width'}})")

        crop: tuple[int, int] | None = None
        if get("do_center_crop"):
            crop_size = _hw_from_size_dict(get("crop_size"))
            if set(crop_size) == {"height", "width"}:
                crop = (int(crop_size["height"]), int(crop_size["width"]))
            else:
                unsupported.append(f"crop_size={crop_size} (only {{'height', 'width'}})")

        resample = get("resample")
        if resample is None:
            resample = int(Image.Resampling.BILINEAR)  # transformers' default when unset
        elif isinstance(resample, (int, np.integer)):
            resample = int(resample)
        else:
            unsupported.append(f"resample={resample!r} (only PIL filter numbers)")

        do_normalize = bool(get("do_normalize"))
        raw_mean, raw_std = get("image_mean"), get("image_std")
        image_mean = None if raw_mean is None else _as_triple(raw_mean, "image_mean", cls_name)
        image_std = None if raw_std is None else _as_triple(raw_std, "image_std", cls_name)
        if do_pad and is_llava and raw_mean is not None and isinstance(raw_mean, (int, float)):
            unsupported.append(f"do_pad=True with a scalar image_mean={raw_mean} (transformers fails on it)")
        if do_normalize and (image_mean is None or image_std is None):
            unsupported.append("do_normalize=True without image_mean / image_std")

        do_rescale = bool(get("do_rescale"))
        rescale_factor = get("rescale_factor")
        if do_rescale and rescale_factor is None:
            unsupported.append("do_rescale=True without rescale_factor")

        if unsupported:
            raise ValueError(f"{cls_name} has options ImageGeometry does not support: " + "; ".join(unsupported))

        return cls(
            pad_to_square=do_pad and is_llava,
            resize=resize,
            resample=resample,
            crop=crop,
            rescale_factor=float(rescale_factor) if rescale_factor is not None else 1 / 255,
            image_mean=image_mean,
            image_std=image_std,
            do_normalize=do_normalize,
            do_rescale=do_rescale,
            do_convert_rgb=bool(get("do_convert_rgb")),
            backend=backend,
        )

    # ------------------------------------------------------------------ sizes

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """LLaVA's pad-to-square background: `int(mean * 255)` per channel (truncated), else black."""
        if not self.image_mean:
            return (0, 0, 0)
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize is None:
            return height, width
        if isinstance(self.resize, tuple):
            return int(self.resize[0]), int(self.resize[1])
        return _shortest_edge_size(height, width, int(self.resize))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the preprocessed image for a source image of (height, width)."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got (height, width) = ({height}, {width})")
        if self.pad_to_square:
            height = width = max(height, width)
        height, width = self._resized_size(height, width)
        if self.crop is not None:
            height, width = self.crop
        return int(height), int(width)

    # ------------------------------------------------------------------ images

    def _image_to_rgb_array(self, image: ImageInput) -> np.ndarray:
        """Validate an image and return it as a uint8 (H, W, 3) array, as the processor sees it."""
        if isinstance(image, Image.Image):
            if not self.do_convert_rgb:
                if image.mode != "RGB":
                    raise ValueError(
                        f"do_convert_rgb is False, so only RGB images are supported; got mode {image.mode!r}. "
                        "Convert the image to RGB first."
                    )
                return np.asarray(image)
            # transformers.image_transforms.convert_to_rgb: alpha is composited onto white.
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
            return np.asarray(image.convert("RGB"))
        if isinstance(image, np.ndarray):
            if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
                return image
        elif isinstance(image, torch.Tensor):
            if image.ndim == 3 and image.shape[0] == 3 and image.dtype == torch.uint8:
                return image.detach().cpu().permute(1, 2, 0).numpy()
        hint = ""
        if (isinstance(image, np.ndarray) and image.dtype != np.uint8) or (
            isinstance(image, torch.Tensor) and image.dtype != torch.uint8
        ):
            hint = " (convert floats in [0, 1] to uint8 with (x * 255).round() first)"
        raise TypeError(f"image must be {_ACCEPTED_IMAGES}; got {_describe(image)}{hint}")

    def _transform_rgb_array(self, array: np.ndarray) -> np.ndarray:
        """Geometry on a uint8 (H, W, 3) array: pad-to-square, resize, center crop."""
        if self.pad_to_square:
            array = _pad_square(array, np.asarray(self.pad_color, dtype=np.uint8))
        if self.resize is not None:
            height, width = self._resized_size(*array.shape[:2])
            if self.backend == "torchvision":
                array = _torchvision_resize(array, (height, width), self.resample)
            else:
                pil = Image.fromarray(np.ascontiguousarray(array))
                array = np.asarray(pil.resize((width, height), resample=self.resample))
        if self.crop is not None:
            array = _center_crop(array, self.crop, np.zeros(3, dtype=np.uint8), self.backend)
        return array

    def transform_image(self, image: ImageInput) -> Image.Image:
        """The preprocessed image's geometry (pad, resize, crop) as an RGB PIL image, no normalization."""
        return Image.fromarray(np.ascontiguousarray(self._transform_rgb_array(self._image_to_rgb_array(image))))

    def _to_float_chw(self, array: np.ndarray) -> np.ndarray:
        """Rescale and normalize a uint8 (H, W, 3) array exactly as the processor's backend does."""
        chw = np.ascontiguousarray(array.transpose(2, 0, 1))
        if self.backend == "torchvision":
            return _torchvision_rescale_and_normalize(chw, self).numpy()
        if self.do_rescale:
            chw = (chw.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(chw.dtype, np.floating):
                chw = chw.astype(np.float32)
            mean = np.asarray(self.image_mean, dtype=chw.dtype)[:, None, None]
            std = np.asarray(self.image_std, dtype=chw.dtype)[:, None, None]
            chw = (chw - mean) / std
        return chw.astype(np.float32, copy=False)

    def to_pixel_values(self, images: ImageInput | Sequence[ImageInput]) -> Float[torch.Tensor, "n 3 H W"]:
        """The processor's `pixel_values` for one image or a sequence of images, as float32.

        (With neither rescale nor normalize the processor returns uint8; the values agree.)
        """
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise TypeError(
                f"images must be an image or a sequence of images ({_ACCEPTED_IMAGES}); got {_describe(images)}"
            )
        if len(images) == 0:
            raise ValueError("to_pixel_values needs at least one image")
        arrays = [self._to_float_chw(self._transform_rgb_array(self._image_to_rgb_array(im))) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"the preprocessed images have different sizes {sorted(s[1:] for s in shapes)} and cannot be "
                "stacked (no center crop or fixed resize); call to_pixel_values on one image at a time"
            )
        return torch.from_numpy(np.stack(arrays))

    # ------------------------------------------------------------------ masks

    @staticmethod
    def _mask_to_array(mask: MaskInput) -> np.ndarray:
        if isinstance(mask, Image.Image):
            if mask.mode not in ("L", "P", "I", "I;16", "1"):
                raise TypeError(f"mask must be {_ACCEPTED_MASKS}; got {_describe(mask)}")
            array = np.asarray(mask)
        elif isinstance(mask, torch.Tensor):
            array = mask.detach().cpu().numpy()
        elif isinstance(mask, np.ndarray):
            array = mask
        else:
            raise TypeError(f"mask must be {_ACCEPTED_MASKS}; got {_describe(mask)}")
        if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise TypeError(f"mask must be {_ACCEPTED_MASKS}; got {_describe(mask)}")
        return array

    def transform_mask(self, mask: MaskInput, ignore_index: int = 255) -> Shaped[np.ndarray, "H W"]:
        """The image geometry applied to a label mask with nearest-neighbour resampling.

        Pixels that come from padding or from outside the image are `ignore_index`. Returns uint8
        when the mask is uint8 / bool (or an L / P / 1 PIL image) and `ignore_index` fits in a
        byte, int64 otherwise. Labels must fit in int32.
        """
        array = self._mask_to_array(mask)
        ignore_index = int(ignore_index)
        small = array.dtype in (np.uint8, np.bool_) and 0 <= ignore_index <= 255
        if small:
            array = array.astype(np.uint8, copy=False)
        else:
            if array.size and (array.min() < _INT32.min or array.max() > _INT32.max):
                raise ValueError(f"mask labels must fit in int32, got range [{array.min()}, {array.max()}]")
            if not _INT32.min <= ignore_index <= _INT32.max:
                raise ValueError(f"ignore_index must fit in int32, got {ignore_index}")
            array = array.astype(np.int32)
        if self.pad_to_square:
            array = _pad_square(array, ignore_index)
        if self.resize is not None:
            height, width = self._resized_size(*array.shape)
            pil = Image.fromarray(np.ascontiguousarray(array))  # mode L (uint8) or I (int32)
            array = np.asarray(pil.resize((width, height), resample=Image.Resampling.NEAREST))
        if self.crop is not None:
            array = _center_crop(array, self.crop, ignore_index, self.backend)
        return np.array(array, dtype=np.uint8 if small else np.int64)

    # ------------------------------------------------------------------ pairs

    @staticmethod
    def image_size(image: ImageInput) -> tuple[int, int]:
        """(height, width) of an accepted image input, validating its type."""
        if isinstance(image, Image.Image):
            return image.height, image.width
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            return int(image.shape[0]), int(image.shape[1])
        if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3 and image.dtype == torch.uint8:
            return int(image.shape[1]), int(image.shape[2])
        raise TypeError(f"image must be {_ACCEPTED_IMAGES}; got {_describe(image)}")

    def transform_pair(
        self, image: ImageInput, mask: MaskInput, ignore_index: int = 255
    ) -> tuple[Image.Image, Shaped[np.ndarray, "H W"]]:
        """`transform_image(image)` and `transform_mask(mask)` after checking they share a size."""
        image_hw = self.image_size(image)
        mask_hw = tuple(int(s) for s in self._mask_to_array(mask).shape)
        if image_hw != mask_hw:
            hint = ""
            if image_hw == mask_hw[::-1]:
                hint = (
                    " The mask looks transposed: PIL sizes are (width, height) while array shapes "
                    "are (height, width)."
                )
            raise ValueError(
                f"image and mask sizes differ: image is (height, width) = {image_hw}, mask is "
                f"(height, width) = {mask_hw}.{hint} Resize the mask to the image size with "
                "nearest-neighbour resampling (e.g. PIL Image.resize((width, height), Image.NEAREST)), "
                "or pass the image the mask was annotated on."
            )
        return self.transform_image(image), self.transform_mask(mask, ignore_index=ignore_index)
