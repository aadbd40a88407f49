"""schemathesis hooks for checking the contract (docs/serving.md): real digit images for the
upload's PNG and JPEG parts, since a schema cannot say that an upload must be a picture of ink.
Loaded by ``schemathesis run`` through SCHEMATHESIS_HOOKS."""

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def digit_image(draw, image_format: str) -> bytes:
    """A grey picture of any size with a bar of ink on it, dark on light or light on dark."""
    side = draw(st.integers(min_value=8, max_value=96))
    pixels = np.full((side, side), 255 if draw(st.booleans()) else 0, dtype=np.uint8)
    top = draw(st.integers(0, side // 2))
    left = draw(st.integers(0, side // 2))
    pixels[top : top + max(2, side // 3), left : left + max(2, side // 8)] = 255 - pixels[0, 0]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=image_format)
    return out.getvalue()


schemathesis.openapi.media_type("image/png", digit_image("PNG"))
schemathesis.openapi.media_type("image/jpeg", digit_image("JPEG"))
