"""NudeNet, as its README uses it: the packaged YOLOv8 detector (320n.onnx) finds body parts in an
image.

The image is drawn here (no photo): a cartoon person, a head with hair, eyes, nose and mouth over
a shirt, and bare feet, on a plain background. Prints the detections (class, score, box) as JSON.

    python nudenet_app.py
"""

from __future__ import annotations

import json

import numpy as np
from nudenet import NudeDetector
from PIL import Image, ImageDraw, ImageFilter

SKIN = (224, 172, 140)


def picture() -> np.ndarray:
    """A 480x640 BGR image (what cv2.imread gives and NudeDetector.detect takes)."""
    img = Image.new("RGB", (480, 640), (200, 215, 230))
    d = ImageDraw.Draw(img)
    d.ellipse((170, 40, 310, 100), fill=(60, 40, 30))  # hair
    d.ellipse((175, 60, 305, 230), fill=SKIN)  # face
    d.ellipse((205, 115, 230, 130), fill=(255, 255, 255))
    d.ellipse((250, 115, 275, 130), fill=(255, 255, 255))
    d.ellipse((212, 117, 224, 129), fill=(50, 80, 40))
    d.ellipse((257, 117, 269, 129), fill=(50, 80, 40))
    d.line((200, 105, 232, 100), fill=(60, 40, 30), width=4)  # brows
    d.line((248, 100, 280, 105), fill=(60, 40, 30), width=4)
    d.polygon([(240, 135), (232, 170), (248, 170)], fill=(205, 150, 120))  # nose
    d.chord((212, 175, 268, 205), 0, 180, fill=(170, 60, 60))  # mouth
    d.rectangle((222, 225, 258, 250), fill=SKIN)  # neck
    d.rounded_rectangle((150, 245, 330, 470), radius=30, fill=(40, 90, 160))  # shirt
    d.rectangle((175, 470, 305, 560), fill=(50, 50, 60))  # trousers
    d.ellipse((160, 560, 235, 600), fill=SKIN)  # feet
    d.ellipse((245, 560, 320, 600), fill=SKIN)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])


def main() -> None:
    detector = NudeDetector()
    detections = detector.detect(picture())
    for det in detections:
        det["score"] = round(det["score"], 4)
    print(json.dumps(sorted(detections, key=lambda d: (d["class"], d["box"]))))


if __name__ == "__main__":
    main()
