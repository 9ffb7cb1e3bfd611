"""RapidOCR, as its README uses it: the packaged PP-OCRv4 models (text detection, direction
classification, recognition) read the text of an image.

The image is drawn here (no scan): three lines of text in Pillow's own font on white, one of them
in a box. Prints each line found (text, score, box corners) as JSON.

    python rapidocr_app.py
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rapidocr_onnxruntime import RapidOCR

LINES = ["RKNN NPU 6 TOPS", "Hello World 2025", "onnxruntime on rk3588"]


def page() -> np.ndarray:
    """A 640x320 RGB image of the lines above (a uint8 array, as RapidOCR takes it)."""
    img = Image.new("RGB", (640, 320), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=40)
    d.text((30, 30), LINES[0], font=font, fill=(0, 0, 0))
    d.text((30, 120), LINES[1], font=font, fill=(20, 20, 120))
    d.rectangle((20, 200, 600, 270), outline=(0, 0, 0), width=2)
    d.text((35, 210), LINES[2], font=font, fill=(0, 0, 0))
    return np.asarray(img)


def main() -> None:
    engine = RapidOCR()
    result, _elapsed = engine(page())
    lines = [
        {"text": text, "score": round(float(score), 4), "box": np.asarray(box).round(1).tolist()}
        for box, text, score in result or []
    ]
    print(json.dumps(lines))


if __name__ == "__main__":
    main()
