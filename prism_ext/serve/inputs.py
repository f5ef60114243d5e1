"""Text -> token ids, token ids -> text and an image file -> pixels: the
only places the server converts inputs."""

from __future__ import annotations

import torch

from ..api import PrismModel
from .errors import BadRequest


def encode_text(model: PrismModel, text: str, add_special_tokens: bool = True) -> list[int]:
    """Text -> token ids as transformers makes them (special tokens added:
    [CLS] ... [SEP] for encoders, none for GPT-2; none for a rendered chat,
    whose template writes its own)."""
    return model.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def decode_tokens(model: PrismModel, ids: list[int]) -> str:
    return model.tokenizer.decode(ids)


def image_pixels(model: PrismModel, data: bytes, field_name: str, max_pixels: int) -> torch.Tensor:
    """One uploaded image file (any format Pillow reads) -> pixel_values [1, C, H, W];
    the pixel limit is checked from the header, before anything is decoded."""
    from ..inputs.images import check_image

    try:
        check_image(data, max_pixels=max_pixels)  # the server's own limit, from the header
        return model.image_processor.to_pixels(data)
    except ValueError as exc:
        raise BadRequest(f"{field_name}: {str(exc).removeprefix('image: ')}", field_name) from None
