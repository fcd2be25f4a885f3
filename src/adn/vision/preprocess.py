"""Image files to network inputs: the one implementation ``adn predict``, ``adn serve`` and
``adn analyze --gradcam`` share.

A trained network expects what its validation data looked like: that many channels, that size, that
normalization. ``adn train`` records it in the checkpoint (``meta["preprocess"]``)::

    {"image_size": 224, "resize_size": 256, "channels": 3, "mean": [...], "std": [...], "interpolation": "bilinear"}

and :meth:`Preprocessing.from_meta` rebuilds it (from ``image_size``, ``in_channels``, ``mean``, ``std`` for
checkpoints written before). An image is decoded with PIL (16-bit grayscale scaled to 8 bits, not
clipped; a floating-point image, such as a float TIFF, scaled by its range: [0, 1] or [0, 255]),
converted to the network's channels, its shorter side resized to ``resize_size``, center-cropped
to ``image_size``, scaled to [0, 1] and normalized.

Only the formats of an allow-list are decoded (:data:`DEFAULT_IMAGE_FORMATS`; ``adn predict`` and ``adn serve``
take ``--image-formats``): the format is recognised from the file's first bytes before any decoder runs, and a file
of another format (EPS, which Pillow hands to Ghostscript; PSD, ICO and other rarely audited decoders) is refused
with :class:`UnsupportedImageFormat`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from .data import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, PixelRangeError, to_8bit

# PIL modes for the channel counts an image can be converted to.
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Past this, the shorter side resized to the network's size makes the longer side absurdly long (and big):
# such an image is a strip, not a picture; it is refused rather than squeezed into a sliver of the crop.
MAX_ASPECT_RATIO = 50
# The image formats decoded unless a command is told otherwise (Pillow's names). Everything else Pillow can open is
# refused before decoding: EPS runs Ghostscript, and the other decoders see far less scrutiny than these.
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}


class ImageError(ValueError):
    """An image that cannot be used; the message says why and what would work."""


class ImageTooLarge(ImageError):
    """An image with more pixels than allowed (a decompression bomb, or simply too big to serve)."""


class UnsupportedImageFormat(ImageError):
    """An image in a format that is not on the allow-list (recognised from its first bytes, never decoded)."""


def image_formats(value: str | Iterable[str], flag: str = "--image-formats") -> tuple[str, ...]:
    """A validated allow-list of Pillow format names from ``"png,jpeg"`` or a sequence (case-insensitive; ``jpg``
    and ``tif`` are accepted for JPEG and TIFF). Raises ValueError naming ``flag`` for an unknown or empty list."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = [_ALIASES.get(str(part).strip().upper(), str(part).strip().upper()) for part in parts]
    names = list(dict.fromkeys(name for name in names if name))
    Image.init()
    unknown = [name for name in names if name not in Image.OPEN]
    if unknown or not names:
        raise ValueError(
            f"{flag} {value if isinstance(value, str) else ','.join(map(str, value))!r}: "
            f"{'unknown format(s) ' + ', '.join(unknown) if unknown else 'no format given'}; give a "
            f"comma-separated list of formats this Pillow reads, such as "
            f"{','.join(DEFAULT_IMAGE_FORMATS).lower()} (the default); known: "
            f"{', '.join(sorted(Image.OPEN)).lower()}"
        )
    return tuple(names)


def _format_list(formats: Iterable[str]) -> str:
    names = [{"WEBP": "WebP"}.get(name, name) for name in formats]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _recognised_format(prefix: bytes, allowed: tuple[str, ...]) -> str | None:
    """The format another of Pillow's plugins recognises from a file's first bytes (its magic number; nothing is
    decoded), or None."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if name in allowed or accept is None:
            continue
        try:
            if accept(prefix) is True:
                return name
        except Exception:  # noqa: BLE001 - a plugin's check failing on odd bytes means "not mine"
            continue
    return None


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input. ``image_size``: side of the square the network sees;
    ``resize_size``: what the shorter side is resized to before the center crop."""

    image_size: int
    resize_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __post_init__(self):
        problems = []
        if not _int_in(self.image_size, 1, 8192) or not _int_in(self.resize_size, 1, 8192):
            problems.append(
                f"image_size and resize_size must be integers in [1, 8192], got {self.image_size!r} and "
                f"{self.resize_size!r}"
            )
        elif self.resize_size < self.image_size:
            problems.append(
                f"resize_size ({self.resize_size}) is below image_size ({self.image_size}): the center "
                f"crop would not fit"
            )
        if self.channels not in MODES:
            problems.append(
                f"channels = {self.channels!r}: images convert to 1 (grayscale), 3 (RGB) or 4 (RGBA) "
                f"channels only; feed tensors to such a network yourself"
            )
        if not (_floats(self.mean, self.channels) and _floats(self.std, self.channels) and min(self.std) > 0):
            problems.append(
                f"mean and std must hold one number per channel ({self.channels}), std positive; got "
                f"{self.mean!r} and {self.std!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if problems:
            raise ValueError("invalid preprocessing: " + "; ".join(problems))

    # ----- where it comes from ---------------------------------------------------------------------------
    @classmethod
    def from_meta(cls, meta: dict, source: str = "checkpoint") -> Preprocessing:
        """The preprocessing a checkpoint's metadata records; for checkpoints without ``preprocess``, what
        their training's validation transform did, rebuilt from the older keys."""
        recorded = meta.get("preprocess")
        if recorded is None:
            try:
                return cls._from_older_meta(meta)
            except ValueError as error:
                raise ValueError(
                    f"{source}: image files cannot be made into this network's inputs ({error})"
                ) from error
        try:
            if not isinstance(recorded, dict):
                raise ValueError(f"expected a dict, got {type(recorded).__name__}")
            known = {"image_size", "resize_size", "channels", "mean", "std", "interpolation"}
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in known})
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{source} has invalid preprocessing metadata ({error}); it was altered or written by "
                f"another tool. Use a checkpoint written by adn train"
            ) from error

    @classmethod
    def _from_older_meta(cls, meta: dict) -> Preprocessing:
        channels = meta["in_channels"]
        size = meta.get("image_size") or 224
        resize = size
        if meta.get("dataset") == "imagefolder":  # data.py's validation transform: resize to size / 0.875, crop
            resize = (meta.get("config") or {}).get("val_resize_size") or int(round(size / 0.875))
        if meta.get("dataset") == "fake":  # fake data is fed as ToTensor gives it, not normalized
            mean, std = (0.0,) * channels, (1.0,) * channels
        else:
            default_mean, default_std = (
                (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
            )
            mean, std = tuple(meta.get("mean") or default_mean), tuple(meta.get("std") or default_std)
        interpolation = (meta.get("config") or {}).get("interpolation") or "bilinear"
        return cls(size, resize, channels, mean, std, interpolation)

    @classmethod
    def for_training(
        cls,
        dataset: str,
        image_size: int,
        channels: int,
        mean,
        std,
        val_resize_size: int | None = None,
        interpolation: str = "bilinear",
    ) -> Preprocessing:
        """What ``adn train``'s validation data of ``dataset`` goes through (see adn.data), for its checkpoint."""
        if dataset == "imagefolder":
            return cls(
                image_size,
                val_resize_size or int(round(image_size / 0.875)),
                channels,
                tuple(mean),
                tuple(std),
                interpolation,
            )
        if dataset == "fake":  # FakeData images are only converted to tensors
            return cls(image_size, image_size, channels, (0.0,) * channels, (1.0,) * channels)
        return cls(image_size, image_size, channels, tuple(mean), tuple(std))  # in-memory sets: native size

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to."""
        return MODES[self.channels]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size

    # ----- images to tensors -----------------------------------------------------------------------------
    def decode(
        self,
        source: bytes | str | os.PathLike,
        name: str | None = None,
        max_pixels: int | None = None,
        formats: Iterable[str] = DEFAULT_IMAGE_FORMATS,
    ) -> Image.Image:
        """Decode an image file (path or bytes) into this preprocessing's mode. Raises :class:`ImageError`
        (naming ``name``, default the path) when it is not an image, or too large or too narrow to use, and
        :class:`UnsupportedImageFormat` for a format not in ``formats`` (checked before decoding)."""
        name = name or (str(source) if not isinstance(source, bytes) else "image")
        with open_image(source, name, formats) as image:
            self.check_size(image.size, name, max_pixels)  # from the header: nothing decoded yet
            try:
                image.load()
            except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
                raise ImageError(
                    f"{name} is not an image that can be read ({error}); use a {_format_list(tuple(formats))} file"
                ) from error
            try:
                return to_8bit(image).convert(self.mode)
            except PixelRangeError as error:  # a float image whose values are not pixels
                raise ImageError(f"{name} cannot be used: {error}") from error

    def check_size(self, size: tuple[int, int], name: str, max_pixels: int | None = None) -> None:
        """Raise :class:`ImageTooLarge` for an image of ``size`` (width, height) over ``max_pixels``,
        :class:`ImageError` for one too narrow to resize and crop usefully."""
        width, height = size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLarge(
                f"{name} is {width}x{height} = {width * height / 1e6:.1f} Mpixels; at most "
                f"{max_pixels / 1e6:.1f} Mpixels are accepted. Downscale it first "
                f"(the network sees {self.image_size}x{self.image_size})"
            )
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageError(
                f"{name} is {width}x{height}: an aspect ratio above {MAX_ASPECT_RATIO}:1 cannot be "
                f"resized and center-cropped to {self.image_size}x{self.image_size} usefully; "
                f"crop it to the object first"
            )

    def transform(self, image: Image.Image) -> torch.Tensor:
        """A decoded image (in :attr:`mode`) as a normalized ``[channels, image_size, image_size]`` tensor."""
        return self._steps(image)

    @functools.cached_property
    def _steps(self):
        from torchvision.transforms import v2

        # Resized and cropped as a PIL image, as adn.data's validation transform does (PIL's resampling).
        return v2.Compose(
            [
                v2.Resize(self.resize_size, interpolation=v2.InterpolationMode(self.interpolation), antialias=True),
                v2.CenterCrop(self.image_size),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def load(
        self,
        source: bytes | str | os.PathLike,
        name: str | None = None,
        max_pixels: int | None = None,
        formats: Iterable[str] = DEFAULT_IMAGE_FORMATS,
    ) -> torch.Tensor:
        """Decode and transform one image file (path or bytes)."""
        return self.transform(self.decode(source, name, max_pixels, formats))

    def load_files(
        self, paths: list[str | os.PathLike], formats: Iterable[str] = DEFAULT_IMAGE_FORMATS
    ) -> torch.Tensor:
        """Image files as one batch ``[N, channels, image_size, image_size]``."""
        return torch.stack([self.load(path, formats=formats) for path in paths])


def image_dimensions(
    source: bytes | str | os.PathLike, name: str | None = None, formats: Iterable[str] = DEFAULT_IMAGE_FORMATS
) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header, without decoding its pixels; the same errors as
    :meth:`Preprocessing.decode` for files that are not images of an accepted format."""
    name = name or (str(source) if not isinstance(source, bytes) else "image")
    with open_image(source, name, formats) as image:
        return image.size


@contextlib.contextmanager
def open_image(source: bytes | str | os.PathLike, name: str, formats: Iterable[str]) -> Iterator[Image.Image]:
    """The image ``source`` opened lazily (header read, pixels not decoded) by the plugins of ``formats`` only;
    :class:`ImageError` for what cannot be used, saying why."""
    formats = tuple(formats)
    if isinstance(source, bytes) and not source:
        raise ImageError(f"{name} is empty (0 bytes); send the image file's contents")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=list(formats))
    except Image.DecompressionBombError as error:  # PIL's own limit, hit before the header is read here
        raise ImageTooLarge(f"{name} is too large to decode ({error}); downscale it first") from error
    except FileNotFoundError as error:
        raise ImageError(f"{name}: no such file") from error
    except UnidentifiedImageError as error:
        other = _recognised_format(_prefix(source), formats)
        if other is not None:
            raise UnsupportedImageFormat(
                f"{name} is in {other} format, which is not accepted here (accepted: "
                f"{_format_list(formats)}; --image-formats changes the list); convert it "
                f"to one of these first"
            ) from error
        # PIL's message for unknown data names the file object ("<_io.BytesIO object at 0x...>"): say it plainly.
        raise ImageError(
            f"{name} is not an image that can be read (not a known image format); use a {_format_list(formats)} file"
        ) from error
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for files it cannot read
        raise ImageError(
            f"{name} is not an image that can be read ({error}); use a {_format_list(formats)} file"
        ) from error
    try:
        yield image
    finally:
        image.close()


def _prefix(source: bytes | str | os.PathLike) -> bytes:
    """The first 16 bytes, what Pillow's plugins recognise a format by."""
    if isinstance(source, bytes):
        return source[:16]
    try:
        with open(source, "rb") as handle:
            return handle.read(16)
    except OSError:
        return b""


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _floats(values, count: int) -> bool:
    return (
        isinstance(values, tuple)
        and len(values) == count
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values)
    )
