"""A generated image set: rendered shapes on random backgrounds.

    python bench/shapes.py OUT_DIR [--per-class 300] [--size 64] [--seed 0]

Six classes (circle, square, triangle, star, cross, ring), one sub-folder each,
JPEG files. Each image: a random background (a colour gradient with noise and
a few random lines), one shape of random colour, size (25-70 % of the side),
position and rotation, sometimes partly covered by a random bar. Not a set a
pretrained network has seen, and not trivial: colour and position say nothing
about the class. The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif kind == "star":
        radii = [1.0 if i % 2 == 0 else 0.42 for i in range(10)]
        angles = np.arange(10) * math.pi / 5 - math.pi / 2
        pts = [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]
    else:  # cross
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
               (-1, w), (-1, -w), (-w, -w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render(kind: str, size: int, rng: np.random.Generator):
    """One image (PIL, RGB, size×size) of class ``kind``."""
    from PIL import Image, ImageDraw

    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    bg = a * (1 - t) + b * t + rng.normal(0, 18, (size, size, 3))
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):  # distractor lines
        xy = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(xy, fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, max(2, size // 24))))
    r = rng.uniform(0.25, 0.7) * size / 2
    cx, cy = rng.uniform(r, size - r, 2)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "ring":
        w = max(2.0, r * rng.uniform(0.25, 0.4))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=int(w))
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=colour)
    if rng.random() < 0.3:  # a bar partly covering the shape
        x0, y0 = rng.uniform(0, size, 2)
        draw.rectangle((x0, y0, x0 + size / 3, y0 + size / 10),
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def generate(out: Path, per_class: int, size: int, seed: int = 0) -> int:
    """Write ``per_class`` images of each class under ``out``; returns the count."""
    rng = np.random.default_rng(seed)
    n = 0
    for kind in CLASSES:
        d = out / kind
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(kind, size, rng).save(d / f"{kind}-{i:05d}.jpg", quality=90)
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(generate(args.out, args.per_class, args.size, args.seed), "images in", args.out)


if __name__ == "__main__":
    main()
