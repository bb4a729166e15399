"""
Image inputs of the Pisces processor: every form transformers processors accept, checked and turned into RGB PIL
images before either image processor sees them, so that an image gives the same pixel values whatever its form and
whichever transformers version is installed (5.17 drops transparency to black and passes arrays through unconverted;
5.24 composites onto white and converts).
"""

import os

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_utils import load_image


def describe(value) -> str:
    """A short description of what was passed, for error messages."""
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{kind} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (str, os.PathLike)):
        return f"{kind} {str(value)!r}"
    return kind


def _array_to_pil(array: np.ndarray, channels_first: bool, where: str, original) -> PIL.Image.Image:
    """An HWC (or CHW if `channels_first`) or HW array, uint8 or float in [0, 1], as a PIL image."""
    if array.ndim == 3:
        # Accept either layout, preferring the usual one for the container (HWC for numpy, CHW for torch).
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if (channels_first and first) or (not last and first):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(
                f"{where} ({describe(original)}) is not an image: expected 1, 3 or 4 channels (HWC for numpy, CHW "
                "for torch)."
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(
            f"{where} ({describe(original)}) is not an image: expected 2 (H, W) or 3 (H, W, C / C, H, W) dimensions."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where} ({describe(original)}) is empty.")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        # Floats in [0, 1] are scaled to bytes; anything larger is taken to be on the 0-255 scale already.
        scale = 255.0 if float(np.nanmax(array)) <= 1.0 else 1.0
        array = np.clip(np.rint(np.nan_to_num(array) * scale), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def to_rgb_image(image, index: int = 0, name: str = "image") -> PIL.Image.Image:
    """
    Converts one image to an RGB PIL image: PIL images of any mode (transparency is composited onto white), numpy
    arrays (HWC or HW, uint8 or float in [0, 1]), torch tensors (CHW or HW), and strings or paths, which transformers'
    `load_image` reads (a local image file, an http(s) URL, or base64 image data). Raises `ValueError` naming `name`,
    `index` and the type given for anything else.
    """
    where = f"{name} {index}"
    if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        # A local file is opened here, not by `load_image`, which converts to RGB before we see it: its transparency
        # would turn black while the same picture in memory is composited onto white.
        try:
            with PIL.Image.open(image) as opened:
                opened.load()
                image = PIL.ImageOps.exif_transpose(opened)
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for unreadable or truncated files
            raise ValueError(f"{where} ({describe(image)}) cannot be read as an image: {error}.") from error
    elif isinstance(image, (str, os.PathLike)):
        try:
            image = load_image(os.fspath(image))
        except Exception as error:  # load_image raises ValueError, OSError or the HTTP client's errors
            raise ValueError(
                f"{where} ({describe(image)}) is not an existing image file, an http(s) URL or base64 image data that "
                f"transformers' load_image can read ({error}); pass a PIL image, a numpy array, a torch tensor or "
                "one of those."
            ) from error
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
        image = _array_to_pil(array, True, where, image)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, False, where, image)
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(
            f"{where} ({describe(image)}) is not an image; expected a PIL image, a numpy array (H, W, C), a torch "
            "tensor (C, H, W), the path of an image file or an http(s) URL."
        )

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        image = PIL.Image.fromarray(np.clip(np.rint(array / peak * 255), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _split_batch(value) -> list:
    """A 4-D array or tensor is a batch of images; anything else is one image."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4:
        return list(value)
    return [value]


def images_per_sample(images, name: str, num_texts: int | None) -> tuple[list, list[list] | None]:
    """
    Normalises `images` (one image, a batch, a flat list, or one list per text) to a flat list and, when given one
    list per text, to those lists.

    Returns (flat list, nested lists or None when images were given flat).
    """
    if images is None:
        return [], None
    if not isinstance(images, (list, tuple)):
        return _split_batch(images), None
    if not any(isinstance(item, (list, tuple)) for item in images):
        return [image for item in images for image in _split_batch(item)], None
    if num_texts is not None and len(images) != num_texts:
        raise ValueError(
            f"{name} has {len(images)} lists of images (one list per text) for {num_texts} texts; pass one list per "
            "text, or a flat list."
        )
    per_sample = []
    for item in images:
        items = item if isinstance(item, (list, tuple)) else [item]
        per_sample.append([image for entry in items if entry is not None for image in _split_batch(entry)])
    return [image for sample in per_sample for image in sample], per_sample


__all__ = ["to_rgb_image", "images_per_sample", "describe"]
