"""Camera frames stored as images: a zarr v3 codec over imagecodecs (JPEG, JPEG XL, AVIF, WebP, PNG, QOI).

A camera key stored with an image codec holds one frame per zarr chunk, encoded as one image, inside
zarr's sharding codec: a shard (one file, or one object in a bucket) holds many frames, and each frame
decodes on its own, as diffusion_policy stores its real-robot cameras (JPEG XL through imagecodecs
in a zarr chunk per frame). The codec is named in the array's metadata (`il_policies.image`, with
its format and quality), so a reader needs only this package imported, which opening a store does.

`parse_image_codec` reads the user's option: `jpeg:95`, `jpegxl:90`, `jpegxl:lossless`,
`avif:80`, `webp:90`, `webp:lossless`, `png`, `qoi` (format[:quality|lossless]); null / "blosc"
keeps Blosc zstd.
"""

from __future__ import annotations

from dataclasses import dataclass

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

__all__ = ["CODEC_NAME", "FORMATS", "IMAGE_CODEC_HELP", "ImageCodec", "parse_image_codec"]

CODEC_NAME = "il_policies.image"
IMAGE_CODEC_HELP = ("store the cameras as one image per frame: jpeg:95, jpegxl:90, jpegxl:lossless, avif:90, webp:90, png, qoi "
                    "(default: Blosc zstd; the README's dataset section compares them)")
LOSSLESS_ONLY = ("png", "qoi")
FORMATS = ("jpeg", "jpegxl", "avif", "webp", "png", "qoi")


def _encoder(fmt: str, quality: int | None):
    """frame (H, W, C) uint8 -> bytes, at `quality` (None: lossless)."""
    lossless = quality is None
    if fmt == "jpeg":
        # 4:4:4: small frames lose too much to 4:2:0's halved colour resolution
        return lambda x: imagecodecs.jpeg8_encode(x, lossless=True) if lossless else imagecodecs.jpeg8_encode(x, level=quality, subsampling="444")
    if fmt == "jpegxl":
        return lambda x: imagecodecs.jpegxl_encode(x, lossless=True) if lossless else imagecodecs.jpegxl_encode(x, level=quality)
    if fmt == "avif":  # quality 100 is AVIF's lossless mode
        return lambda x: imagecodecs.avif_encode(x, level=100 if lossless else quality, speed=8)
    if fmt == "webp":
        return lambda x: imagecodecs.webp_encode(x, lossless=lossless, level=None if lossless else quality)
    if fmt == "png":
        return lambda x: imagecodecs.png_encode(x)
    return lambda x: imagecodecs.qoi_encode(x)


_DECODERS = {"jpeg": imagecodecs.jpeg8_decode, "jpegxl": imagecodecs.jpegxl_decode, "avif": imagecodecs.avif_decode,
             "webp": imagecodecs.webp_decode, "png": imagecodecs.png_decode, "qoi": imagecodecs.qoi_decode}


@dataclass(frozen=True)
class ImageCodec(ArrayBytesCodec):
    """One (1, H, W, C) uint8 chunk <-> one encoded image. `quality` None: lossless."""

    is_fixed_size = False
    format: str = "jpeg"
    quality: int | None = 95

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"image codec format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format in LOSSLESS_ONLY and self.quality is not None:
            raise ValueError(f"image codec {self.format} is lossless only: give no quality")
        if self.quality is not None and not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise ValueError(f"image codec quality must be an integer in [1, 100], got {self.quality!r}")

    @classmethod
    def from_dict(cls, data: dict) -> ImageCodec:
        return cls(**data.get("configuration", {}))

    def to_dict(self) -> dict:
        return {"name": CODEC_NAME, "configuration": {"format": self.format, "quality": self.quality}}

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec) -> Buffer:
        frames = chunk_array.as_numpy_array()
        if frames.shape[0] != 1:
            raise ValueError(f"image codec {self.format} encodes one frame per chunk, got a chunk of {frames.shape[0]}")
        return chunk_spec.prototype.buffer.from_bytes(_encoder(self.format, self.quality)(np.ascontiguousarray(frames[0])))

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec) -> NDBuffer:
        frame = _DECODERS[self.format](chunk_bytes.to_bytes())
        return chunk_spec.prototype.nd_buffer.from_numpy_array(np.asarray(frame, dtype=np.uint8).reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec) -> Buffer:
        return self._encode_sync(chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec) -> int:
        raise NotImplementedError("image codecs have no fixed encoded size")


def parse_image_codec(text: str | None) -> ImageCodec | None:
    """`format[:quality|lossless]` -> the codec; None or "blosc" -> None (Blosc zstd)."""
    if text is None or str(text).lower() in ("blosc", "none", "null", ""):
        return None
    fmt, _, level = str(text).lower().partition(":")
    if level == "lossless" or (level == "" and fmt in LOSSLESS_ONLY):
        return ImageCodec(fmt, None)
    if not level.isdigit():
        raise ValueError(f"image codec {text!r}: write format:quality (1-100) or format:lossless, formats {', '.join(FORMATS)}")
    return ImageCodec(fmt, int(level))


register_codec(CODEC_NAME, ImageCodec)
