"""The embedded default dataset: a scaled-down PASCAL VOC drawn from a seed.

    python -m wsss.data.synthetic --out data/synthetic [--seed 0] [--train 400] [--val 100] [--size 256]

Why it looks the way it does: the dataset judges the pipeline, so it has the properties that make
weakly supervised segmentation hard on VOC, not just objects on a plain ground.

- Six classes of cartoon things (beetle, flower, turtle, car, caterpillar, fish) from several shape
  families: ellipses, lobed blobs, irregular polygons, composites and long curved chains, 4-50 %
  of the image, at any position, rotation (cars and fish stay roughly upright) and aspect.
- Every object has a *discriminative part* (beetle head, flower centre, turtle head, car wheels,
  caterpillar head, fish face) of 10-20 % of its area with a fixed class-specific colour pattern,
  while its *body* is only weakly class-specific: body colours are drawn around a class hue with
  a wide spread (a quarter of them at any hue) and body textures are the class's favourite only
  about half the time. A classifier finds the part first (plain CAM under-covers); with the part
  erased, silhouette, texture and colour of the body still tell the classes apart, so adversarial
  erasing has something to find. `SegmentationPart/ID.png` marks the parts (class id) so stages
  can measure this.
- Clean backgrounds (smooth low-saturation gradients, low-contrast noise, sometimes a horizon), on
  which objects are salient, and cluttered ones (textured patches, distractor shapes of no class,
  lines), on which they are less so. Scene types are mildly correlated with classes (fish on
  water, cars on roads), as context is on VOC.
- *Simple* images (one object, clean background; about 38 %) for STC, and complex ones: one class
  on clutter, or 2-3 classes with occlusion (the mask holds the top object), sometimes two
  instances of a class.
- Image sides vary from 0.75 to 1.125 times `size` (192..288 px for 256) so nothing may assume a
  square or fixed size. Masks carry a 3-pixel 255 (ignore) band along every object border, like
  VOC's ground truth.

Output, in the VOC layout (see wsss/data/voc.py): JPEGImages/ID.jpg (quality 95),
SegmentationClassAug/ID.png, SegmentationPart/ID.png, ImageSets/Segmentation/{train,val,train_aug}.txt
(train_aug = train), cls_labels.npy, class_names.txt, and dataset.json written last (arguments,
counts per class, simple/complex counts, simple ids). Each image is drawn from its own generator
seeded by (seed, split, index), so the files are byte-identical for a seed whatever the number of
worker processes; a folder whose dataset.json matches the arguments is not regenerated.
"""
from __future__ import annotations

import argparse
import colorsys
import io as _io
import os
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import map_coordinates, maximum_filter, minimum_filter
from tqdm import tqdm

from wsss.io import IGNORE, read_json, write_bytes, write_json, write_mask, write_npy
from wsss.run import process_pool

CLASS_NAMES = ("background", "beetle", "flower", "turtle", "car", "caterpillar", "fish")
VERSION = 1  # bump when the drawing changes, so old folders are regenerated
SPLITS = {"train": 0, "val": 1}
IGNORE_WIDTH = 3  # pixels, straddling each border between two labels
SIMPLE_FRACTION = 0.38  # one object on a clean background
SINGLE_CLUTTER_FRACTION = 0.15  # one class (1-2 instances) on clutter; the rest hold 2-3 classes
GOLDEN = 0.6180339887498949
ID_PATTERN = re.compile(r"^(train|val)_\d{5}\.(jpg|png)$")

# Bodies: hue centre of each class (a wide spread around it), the texture it wears most often.
BODY_HUE = {"beetle": 0.03, "flower": 0.86, "turtle": 0.30, "car": 0.60, "caterpillar": 0.18, "fish": 0.50}
FAVOURITE_TEXTURE = {"beetle": "spots", "flower": "veins", "turtle": "cells", "car": "mottled",
                     "caterpillar": "stripes", "fish": "cells"}
TEXTURES = ("spots", "stripes", "cells", "mottled", "rings", "veins")
# Scenes: (hue, saturation, value) at the two ends of the gradient; the class each suits.
SCENES = {
    "sky": ((0.58, 0.30, 0.90), (0.56, 0.12, 0.97)),
    "water": ((0.54, 0.35, 0.62), (0.58, 0.40, 0.42)),
    "grass": ((0.26, 0.35, 0.62), (0.22, 0.40, 0.42)),
    "sand": ((0.11, 0.22, 0.85), (0.09, 0.30, 0.66)),
    "road": ((0.60, 0.04, 0.52), (0.60, 0.06, 0.34)),
    "wall": ((0.08, 0.10, 0.86), (0.07, 0.14, 0.62)),
}
CLASS_SCENE = {"beetle": "sand", "flower": "grass", "turtle": "sand", "car": "road",
               "caterpillar": "grass", "fish": "water"}


def hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))),
                    dtype=np.float32)


def smoothstep(x, width=1.0):
    """0 below -width/2, 1 above +width/2, smooth in between (anti-aliased thresholds)."""
    t = np.clip(x / width + 0.5, 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ---------------------------------------------------------------- textures (functions of local coords)

def make_texture(rng: np.random.Generator, kind: str):
    """A field t(u, v) in [0, 1] over the object's own coordinates (it turns with the object)."""
    if kind == "spots":
        centres = rng.uniform(-1.4, 1.4, (int(rng.integers(10, 22)), 2))
        radii = rng.uniform(0.07, 0.17, len(centres))

        def field(u, v):
            d = np.full(u.shape, np.inf, np.float32)
            for (cx, cy), r in zip(centres, radii, strict=True):
                d = np.minimum(d, np.hypot(u - cx, v - cy) - r)
            return smoothstep(-d, 0.04)
    elif kind == "stripes":
        freq, phase, angle = rng.uniform(2.0, 4.5), rng.uniform(0, 2 * np.pi), rng.normal(0, 0.4)
        c, s = np.cos(angle), np.sin(angle)

        def field(u, v):
            return smoothstep(np.sin(2 * np.pi * freq * (u * c + v * s) + phase), 0.6)
    elif kind == "cells":
        k, angle = rng.uniform(9, 16), rng.uniform(0, np.pi)
        dirs = [(np.cos(angle + a), np.sin(angle + a)) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]

        def field(u, v):
            h = sum(np.cos(k * (u * dx + v * dy)) for dx, dy in dirs)  # hexagonal lattice, -1.5..3
            return smoothstep(-h - 0.2, 0.8)  # dark rims between cells
    elif kind == "mottled":
        cells = int(rng.integers(4, 9))
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)

        def field(u, v):
            coords = np.stack([(np.clip(v, -1.6, 1.6) + 1.6) / 3.2 * cells,
                               (np.clip(u, -1.6, 1.6) + 1.6) / 3.2 * cells])
            return map_coordinates(grid, coords.reshape(2, -1), order=1, mode="nearest").reshape(u.shape)
    elif kind == "rings":
        freq, ox, oy = rng.uniform(2.5, 5), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)

        def field(u, v):
            return smoothstep(np.sin(2 * np.pi * freq * np.hypot(u - ox, v - oy)), 0.7)
    elif kind == "veins":
        n, ox, oy = int(rng.integers(10, 24)), rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)

        def field(u, v):
            theta = np.arctan2(v - oy, u - ox)
            return smoothstep(np.cos(n * theta) - 0.5, 0.5) * smoothstep(np.hypot(u - ox, v - oy) - 0.35, 0.3)
    else:
        raise ValueError(f"unknown texture '{kind}'")
    return field


def body_colour(rng: np.random.Generator, name: str, avoid: np.ndarray | None) -> np.ndarray:
    """A body colour around the class hue (a quarter at any hue), far enough from `avoid` (the
    background) that the object stays salient on a clean background."""
    for _ in range(30):
        hue = rng.random() if rng.random() < 0.25 else BODY_HUE[name] + rng.normal(0, 0.07)
        colour = hsv(hue, rng.uniform(0.3, 0.75), rng.uniform(0.35, 0.9))
        if avoid is None or np.linalg.norm(colour - avoid) > 0.3:
            break
    return colour


def body_paint(rng: np.random.Generator, name: str, avoid=None, base=None):
    """Paint for a body: base colour mixed with a second shade by a texture, with mottling and a
    light gradient so no body is a flat colour."""
    base = body_colour(rng, name, avoid) if base is None else base
    choice = rng.random()
    if choice < 0.45:
        second = base * rng.uniform(0.45, 0.7)
    elif choice < 0.75:
        second = base + (1 - base) * rng.uniform(0.3, 0.55)
    else:
        h, s, v = colorsys.rgb_to_hsv(*base)
        second = hsv(h + rng.choice([-1, 1]) * rng.uniform(0.06, 0.14), s, v * rng.uniform(0.75, 1.1))
    kind = FAVOURITE_TEXTURE[name] if rng.random() < 0.5 else TEXTURES[int(rng.integers(len(TEXTURES)))]
    texture, mottle = make_texture(rng, kind), make_texture(rng, "mottled")
    light = rng.normal(0, 1, 2)
    light *= rng.uniform(0.08, 0.18) / np.linalg.norm(light)

    def paint(u, v):
        t = texture(u, v)[..., None]
        shade = (0.82 + 0.36 * mottle(u, v) + light[0] * u + light[1] * v)[..., None]
        return (base * (1 - t) + second * t) * shade
    return paint


def flat_paint(rng: np.random.Generator, colour):
    colour = np.asarray(colour, np.float32)
    mottle = make_texture(rng, "mottled")

    def paint(u, v):
        return colour * (0.88 + 0.24 * mottle(u, v))[..., None]
    return paint


# ---------------------------------------------------------------- shapes (in local unit coords)

def ellipse(cx, cy, a, b, angle=0.0, n=48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def rounded_rect(x0, y0, x1, y1, r, n=6) -> np.ndarray:
    pts = []
    for cx, cy, start in ((x1 - r, y1 - r, 0), (x0 + r, y1 - r, 90), (x0 + r, y0 + r, 180), (x1 - r, y0 + r, 270)):
        t = np.radians(np.linspace(start, start + 90, n))
        pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1))
    return np.concatenate(pts)


class Layer:
    """Polygons (filled) and polylines (stroked, width in local units) painted by one function;
    `head` marks the class-discriminative part."""

    def __init__(self, paint, polys=(), lines=(), head=False):
        self.paint, self.polys, self.lines, self.head = paint, list(polys), list(lines), head

    def points(self) -> list[np.ndarray]:
        return self.polys + [line for line, _ in self.lines]


def coverage(layers, alphas) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the whole object and of its visible discriminative part (coverage >= 0.5)."""
    whole, head = np.zeros_like(alphas[0]), np.zeros_like(alphas[0])
    for layer, a in zip(layers, alphas, strict=True):
        whole = np.maximum(whole, a)
        head = np.maximum(head, a) if layer.head else head * (1 - a)
    return whole >= 0.5, head >= 0.5


def beetle(rng, avoid):
    b = 1 / rng.uniform(1.2, 1.6)
    dark = body_colour(rng, "beetle", None) * 0.3
    legs = [np.array([[x, 0.0], [x + rng.uniform(-0.25, 0.25), side * (b + 0.3)]])
            for x in (-0.45, 0.0, 0.4) for side in (-1, 1)]
    head_colour = hsv(rng.uniform(0.55, 0.7), 0.3, rng.uniform(0.08, 0.16))
    return [
        Layer(flat_paint(rng, dark), lines=[(leg, 0.07) for leg in legs]),
        Layer(body_paint(rng, "beetle", avoid), polys=[ellipse(-0.12, 0, 0.88, b)]),
        Layer(flat_paint(rng, dark), lines=[(np.array([[-0.95, 0.0], [0.5, 0.0]]), 0.035)]),
        Layer(flat_paint(rng, head_colour), polys=[ellipse(0.78, 0, 0.32, 0.55 * b)], head=True,
              lines=[(np.array([[0.95, s * 0.12 * b], [1.2, s * 0.3 * b], [1.32, s * 0.5 * b]]), 0.045)
                     for s in (-1, 1)]),
        Layer(flat_paint(rng, (0.95, 0.95, 0.9)), polys=[ellipse(0.86, s * 0.25 * b, 0.09, 0.1 * b + 0.03)
                                                          for s in (-1, 1)], head=True),
    ]


def flower(rng, avoid):
    k, squash, spin = int(rng.integers(5, 9)), rng.uniform(0.8, 1.0), rng.uniform(0, 2 * np.pi)
    t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    lobes = rng.uniform(0.85, 1.0, k)[(np.floor((t + spin) * k / (2 * np.pi)) % k).astype(int)]
    r = (0.5 + 0.5 * np.abs(np.cos(k * (t + spin) / 2)) ** 0.7) * lobes
    petals = np.stack([r * np.cos(t), squash * r * np.sin(t)], 1)
    centre_r = rng.uniform(0.3, 0.35)
    layers = []
    if rng.random() < 0.6:  # stem and leaf: thin parts that CAM will miss
        stem_colour = hsv(rng.uniform(0.22, 0.33), rng.uniform(0.4, 0.7), rng.uniform(0.3, 0.6))
        bend = rng.uniform(-0.4, 0.4)
        stem = np.array([[0, 0.5], [bend * 0.4, 1.1], [bend, 1.7]])
        leaf = ellipse(bend * 0.3 + 0.25, 1.15, 0.3, 0.1, angle=rng.uniform(-0.8, -0.2))
        layers.append(Layer(flat_paint(rng, stem_colour), polys=[leaf], lines=[(stem, 0.09)]))
    gold = hsv(rng.uniform(0.11, 0.14), rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0))
    brown = hsv(0.07, 0.8, rng.uniform(0.25, 0.4))
    seeds = make_texture(rng, "cells")

    def centre(u, v):
        rim = smoothstep(np.hypot(u, v / squash) - 0.85 * centre_r, 0.04)
        t = np.maximum(seeds(u * 1.6, v * 1.6), rim)[..., None]
        return gold * (1 - t) + brown * t
    layers += [
        Layer(body_paint(rng, "flower", avoid), polys=[petals]),
        Layer(centre, polys=[ellipse(0, 0, centre_r, squash * centre_r)], head=True),
    ]
    return layers


def turtle(rng, avoid):
    b, n = rng.uniform(0.72, 0.88), int(rng.integers(7, 10))
    t = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
    radius = rng.uniform(0.92, 1.06, n)
    shell = np.stack([radius * np.cos(t), b * radius * np.sin(t)], 1)
    skin = hsv(rng.uniform(0.1, 0.2), rng.uniform(0.15, 0.35), rng.uniform(0.35, 0.6))
    legs = [ellipse(x * 0.55, y * 0.8 * b, 0.3, 0.17, angle=x * y * 0.6) for x in (-1, 1) for y in (-1, 1)]
    tail = np.array([[-0.9, -0.08], [-1.22, 0.0], [-0.9, 0.08]])
    lime = hsv(rng.uniform(0.2, 0.25), rng.uniform(0.75, 0.95), rng.uniform(0.7, 0.9))
    dark_green = hsv(0.33, 0.8, 0.25)
    scales = make_texture(rng, "cells")

    def head(u, v):
        t = 0.75 * scales(u * 1.5, v * 1.5)[..., None]
        return lime * (1 - t) + dark_green * t
    return [
        Layer(flat_paint(rng, skin), polys=legs + [tail]),
        Layer(flat_paint(rng, skin * 0.6), polys=[shell * 1.04]),
        Layer(body_paint(rng, "turtle", avoid), polys=[shell]),
        Layer(head, polys=[ellipse(1.22, 0, 0.36, 0.27), np.array([[0.85, -0.13], [1.05, -0.15], [1.05, 0.15],
                                                                    [0.85, 0.13]])], head=True),
        Layer(flat_paint(rng, (0.05, 0.05, 0.05)), polys=[ellipse(1.38, s * 0.13, 0.05, 0.05) for s in (-1, 1)],
              head=True),
    ]


def car(rng, avoid):
    roof, front = rng.uniform(-0.55, -0.42), rng.uniform(0.45, 0.7)
    cabin = np.array([[-0.6, 0.0], [-0.38, roof], [0.35, roof], [front, 0.0]])
    windows = [np.array([[-0.5, -0.04], [-0.33, roof + 0.06], [-0.03, roof + 0.06], [-0.03, -0.04]]),
               np.array([[0.03, -0.04], [0.03, roof + 0.06], [0.3, roof + 0.06], [front - 0.1, -0.04]])]
    glass = hsv(rng.uniform(0.5, 0.65), rng.uniform(0.1, 0.3), rng.uniform(0.2, 0.45))
    wheel_r = rng.uniform(0.19, 0.22)
    centres = [(-0.6, 0.42), (0.6, 0.42)]
    tyre, silver = hsv(0.6, 0.1, rng.uniform(0.05, 0.12)), hsv(0.6, 0.05, rng.uniform(0.75, 0.9))

    def wheels(u, v):
        d = np.min([np.hypot(u - cx, v - cy) for cx, cy in centres], axis=0) / wheel_r
        angle = np.arctan2(v - centres[0][1], u - np.where(u < 0, centres[0][0], centres[1][0]))
        spokes = smoothstep(np.cos(5 * angle) - 0.3, 0.4) * smoothstep(0.58 - d, 0.05) * smoothstep(d - 0.22, 0.05)
        rim = smoothstep(0.62 - d, 0.05)[..., None]
        inner = silver * (1 - 0.6 * spokes[..., None])
        return tyre * (1 - rim) + inner * rim
    paint = body_paint(rng, "car", avoid)
    return [
        Layer(paint, polys=[rounded_rect(-1.0, -0.05, 1.0, 0.45, 0.12), cabin]),
        Layer(flat_paint(rng, glass), polys=windows),
        Layer(flat_paint(rng, (1.0, 0.95, 0.7)), polys=[rounded_rect(0.9, 0.05, 1.0, 0.17, 0.03)]),
        Layer(wheels, polys=[ellipse(cx, cy, wheel_r, wheel_r) for cx, cy in centres], head=True),
    ]


def caterpillar(rng, avoid):
    n = int(rng.integers(8, 12))
    amp, waves, phase = rng.uniform(0, 0.35), rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
    s = np.linspace(0, 1, 200)
    path = np.stack([2 * s - 1, amp * np.sin(np.pi * waves * 2 * s + phase)], 1)
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    at = np.interp(np.linspace(0, arc[-1], n), arc, np.arange(len(s)))
    centres = np.stack([np.interp(at, np.arange(len(s)), path[:, i]) for i in (0, 1)], 1)
    r = arc[-1] / (n - 1) / 1.25  # segments overlap
    paint = body_paint(rng, "caterpillar", avoid)
    dark = body_colour(rng, "caterpillar", None) * 0.35
    feet = [ellipse(x, y + r * 0.9, r * 0.25, r * 0.35) for x, y in centres[:-1]]
    segments = [Layer(paint, polys=[ellipse(x, y, r, r * rng.uniform(0.9, 1.05))]) for x, y in centres[:-1]]
    hx, hy = centres[-1]
    red = hsv(rng.uniform(-0.02, 0.02), rng.uniform(0.85, 1.0), rng.uniform(0.75, 0.95))
    return [Layer(flat_paint(rng, dark), polys=feet), *segments,
            Layer(flat_paint(rng, red), polys=[ellipse(hx, hy, 1.15 * r, 1.15 * r)], head=True,
                  lines=[(np.array([[hx + 0.5 * r, hy + side * 0.5 * r], [hx + 1.4 * r, hy + side * 1.2 * r]]), 0.04)
                         for side in (-1, 1)]),
            Layer(flat_paint(rng, (0.97, 0.97, 0.95)),
                  polys=[ellipse(hx + 0.45 * r, hy + side * 0.4 * r, 0.3 * r, 0.3 * r) for side in (-1, 1)], head=True),
            Layer(flat_paint(rng, (0.03, 0.03, 0.03)),
                  polys=[ellipse(hx + 0.55 * r, hy + side * 0.4 * r, 0.14 * r, 0.14 * r) for side in (-1, 1)],
                  head=True)]


def fish(rng, avoid):
    b = rng.uniform(0.35, 0.5)
    t = np.linspace(-np.pi / 2, np.pi / 2, 40)
    cap_x = 0.5
    cap = np.stack([np.cos(t), b * np.sin(t)], 1)
    cap = np.concatenate([[[cap_x, b * np.sqrt(1 - cap_x ** 2)]], cap[np.cos(t) > cap_x][::-1],
                          [[cap_x, -b * np.sqrt(1 - cap_x ** 2)]]])
    fork = rng.uniform(0.1, 0.3)
    tail = np.array([[-0.8, 0.0], [-1.45, -0.45], [-1.45 + fork, 0.0], [-1.45, 0.45]])
    dorsal = np.array([[-0.45, -0.8 * b], [-0.1, -b - rng.uniform(0.15, 0.3)], [0.25, -0.85 * b]])
    pelvic = np.array([[-0.2, 0.8 * b], [-0.05, b + 0.15], [0.15, 0.85 * b]])
    paint = body_paint(rng, "fish", avoid)
    blue = hsv(rng.uniform(0.6, 0.66), rng.uniform(0.8, 0.95), rng.uniform(0.6, 0.8))
    yellow = hsv(rng.uniform(0.13, 0.16), 0.95, 0.97)

    def face(u, v):
        band = (smoothstep(u - 0.52, 0.02) * smoothstep(0.64 - u, 0.02))[..., None]
        return blue * (1 - band) + yellow * band
    eye = (0.82, -0.25 * b)
    return [
        Layer(paint, polys=[tail, dorsal, pelvic, ellipse(0, 0, 1.0, b)]),
        Layer(face, polys=[cap], head=True),
        Layer(flat_paint(rng, (0.97, 0.97, 0.95)), polys=[ellipse(*eye, 0.075, 0.075)], head=True),
        Layer(flat_paint(rng, (0.03, 0.03, 0.03)), polys=[ellipse(eye[0] + 0.01, eye[1], 0.04, 0.04)], head=True),
    ]


BUILDERS = {"beetle": beetle, "flower": flower, "turtle": turtle, "car": car, "caterpillar": caterpillar,
            "fish": fish}
UPRIGHT = {"car": 0.15, "fish": 0.45}  # std of the rotation (radians) of classes that stay upright


# ---------------------------------------------------------------- rasterising

class Pose:
    """Local unit coords -> image pixels: mirror x, scale, rotate, translate."""

    def __init__(self, cx, cy, scale, angle, mirror):
        self.cx, self.cy, self.scale, self.mirror = cx, cy, scale, -1.0 if mirror else 1.0
        self.cos, self.sin = np.cos(angle), np.sin(angle)

    def forward(self, pts):
        x, y = pts[:, 0] * self.mirror * self.scale, pts[:, 1] * self.scale
        return np.stack([self.cx + self.cos * x - self.sin * y, self.cy + self.sin * x + self.cos * y], 1)

    def inverse(self, xs, ys):
        dx, dy = xs - self.cx, ys - self.cy
        return ((self.cos * dx + self.sin * dy) / self.scale * self.mirror,
                (-self.sin * dx + self.cos * dy) / self.scale)


def rasterise(layer: Layer, pose: Pose, shape) -> np.ndarray:
    """Anti-aliased coverage (float32 0..1, HxW) of a layer under a pose."""
    canvas = np.zeros(shape, np.uint8)
    for poly in layer.polys:
        pts = np.round(pose.forward(poly) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 255, lineType=cv2.LINE_AA, shift=4)
    for line, width in layer.lines:
        pts = np.round(pose.forward(line) * 16).astype(np.int32)
        thickness = max(1, int(round(width * pose.scale)))
        cv2.polylines(canvas, [pts], False, 255, thickness=thickness, lineType=cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def measure(layers, px=60.0) -> tuple[float, float]:
    """Area of the whole object and of its discriminative part in local units^2."""
    extent = max(np.abs(p).max() for layer in layers for p in layer.points()) + 0.3
    size = int(np.ceil(2 * extent * px))
    pose = Pose(size / 2, size / 2, px, 0.0, False)
    whole, head = coverage(layers, [rasterise(layer, pose, (size, size)) for layer in layers])
    return whole.sum() / px ** 2, head.sum() / px ** 2


class PlacedObject:
    """An object's layers, pose, per-layer coverage in the image, and its object and part masks."""

    def __init__(self, cls, layers, pose, alphas):
        self.cls, self.layers, self.pose, self.alphas = cls, layers, pose, alphas
        self.mask, self.head = coverage(layers, alphas)


def place(rng, cls: int, area_fraction: float, shape, instance: np.ndarray, placed: list, avoid):
    """Draw an object's shape and find a pose where it is mostly inside the image and does not hide
    more than 40 % of an earlier object (or half of its part). None if no pose is found."""
    name = CLASS_NAMES[cls]
    layers = BUILDERS[name](rng, avoid)
    unit_area, unit_head = measure(layers)
    h, w = shape
    for attempt in range(48):
        area = area_fraction * h * w * 0.85 ** (attempt // 8)
        scale = np.sqrt(area / unit_area)
        angle = rng.normal(0, UPRIGHT[name]) if name in UPRIGHT else rng.uniform(0, 2 * np.pi)
        mirror = rng.random() < 0.5
        pts = np.concatenate([Pose(0, 0, scale, angle, mirror).forward(p) for layer in layers for p in layer.points()])
        lo, hi = pts.min(0), pts.max(0)
        half = (hi - lo) / 2  # the box may stick out of the image by a fifth of its size
        cx = rng.uniform(min(half[0] * 0.8, w / 2), max(w - half[0] * 0.8, w / 2)) - (lo[0] + half[0])
        cy = rng.uniform(min(half[1] * 0.8, h / 2), max(h - half[1] * 0.8, h / 2)) - (lo[1] + half[1])
        pose = Pose(cx, cy, scale, angle, mirror)
        alphas = [rasterise(layer, pose, shape) for layer in layers]
        obj = PlacedObject(cls, layers, pose, alphas)
        if obj.mask.sum() < 0.75 * unit_area * scale ** 2 or obj.head.sum() < 0.6 * unit_head * scale ** 2:
            continue  # too far out of the image
        covered = instance.copy()
        covered[obj.mask] = len(placed)
        if all((covered == j).sum() >= 0.6 * p.mask.sum() and (p.head & (covered == j)).sum() >= 0.5 * p.head.sum()
               for j, p in enumerate(placed)):
            return obj, covered
    return None


# ---------------------------------------------------------------- backgrounds

def smooth_noise(rng, shape, cells) -> np.ndarray:
    """Low-frequency noise in [0, 1] over an HxW image."""
    h, w = shape
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def clean_background(rng, shape, scene: str) -> np.ndarray:
    h, w = shape
    (h0, s0, v0), (h1, s1, v1) = SCENES[scene]
    jitter = lambda: rng.normal(0, 0.02)  # noqa: E731
    top = hsv(h0 + jitter(), s0 + jitter(), v0 + 2 * jitter())
    bottom = hsv(h1 + jitter(), s1 + jitter(), v1 + 2 * jitter())
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    angle = np.pi / 2 + rng.normal(0, 0.5)
    g = (xx * np.cos(angle) + yy * np.sin(angle))
    g = ((g - g.min()) / (g.max() - g.min() + 1e-6))[..., None]
    image = top * (1 - g) + bottom * g
    if scene in ("grass", "sand", "water", "road") and rng.random() < 0.3:  # a horizon under a sky
        sky = hsv(0.58 + jitter(), 0.25 + jitter(), 0.92)
        line = h * rng.uniform(0.15, 0.45) + (xx - w / 2) * rng.normal(0, 0.08)
        above = smoothstep(line - yy, 3.0)[..., None]
        image = image * (1 - above) + sky * above
    image *= (0.94 + 0.12 * smooth_noise(rng, shape, int(rng.integers(3, 7))))[..., None]
    if scene == "water":
        image *= (1 + 0.03 * np.sin(yy * rng.uniform(0.2, 0.4) + 3 * smooth_noise(rng, shape, 4)))[..., None]
    return image


def distractor(rng) -> np.ndarray:
    """An ellipse, triangle, star or rounded box: shapes that belong to no class."""
    which = int(rng.integers(4))
    if which == 0:
        return ellipse(0, 0, 1, rng.uniform(0.4, 1))
    if which == 1:
        return np.array([[-1, 0.8], [1, 0.8], [rng.uniform(-0.5, 0.5), -1]])
    if which == 2:
        return ellipse(0, 0, 1, 1, n=10) * np.tile([[1.0], [0.45]], (5, 2))
    return rounded_rect(-1, -0.6, 1, 0.6, 0.3)


def clutter(rng, image: np.ndarray, scene: str) -> None:
    """Textured patches, distractor shapes of no class and lines, drawn onto `image` in place."""
    h, w = image.shape[:2]
    side = min(h, w)
    base = image.reshape(-1, 3).mean(0)
    bh, bs, bv = colorsys.rgb_to_hsv(*base)
    for _ in range(int(rng.integers(14, 30))):
        if rng.random() < 0.5:
            colour = hsv(bh + rng.normal(0, 0.05), bs + rng.uniform(-0.1, 0.25), bv * rng.uniform(0.5, 1.3))
        else:
            colour = hsv(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.25, 0.9))
        kind = rng.choice(["patch", "shape", "line"], p=[0.4, 0.35, 0.25])
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        size = side * np.exp(rng.uniform(np.log(0.08), np.log(0.5)))
        if kind == "line":
            n = int(rng.integers(2, 5))
            pts = np.stack([cx + np.cumsum(rng.normal(0, size, n)), cy + np.cumsum(rng.normal(0, size, n))], 1)
            layer = Layer(None, lines=[(pts, rng.uniform(1.5, 5.0))])
            pose = Pose(0, 0, 1.0, 0.0, False)
        else:
            if kind == "patch" and rng.random() < 0.5:
                poly = rounded_rect(-1, -rng.uniform(0.3, 1), 1, rng.uniform(0.3, 1), 0.05)
            elif kind == "patch":
                n = int(rng.integers(5, 9))
                t = np.sort(rng.uniform(0, 2 * np.pi, n))
                poly = np.stack([np.cos(t), np.sin(t)], 1) * rng.uniform(0.5, 1, (n, 1))
            else:
                poly = distractor(rng)
            layer = Layer(None, polys=[poly])
            pose = Pose(cx, cy, size / 2, rng.uniform(0, 2 * np.pi), False)
        alpha = rasterise(layer, pose, (h, w))
        ys, xs = np.nonzero(alpha)
        if not len(ys):
            continue
        u, v = pose.inverse(xs.astype(np.float32), ys.astype(np.float32))
        if kind == "patch":
            second = colour * rng.uniform(0.5, 0.8) if rng.random() < 0.5 else hsv(rng.random(), 0.3, bv)
            tex = make_texture(rng, str(rng.choice(["stripes", "cells", "mottled", "rings", "spots"])))
            t = tex(u * 2, v * 2)[:, None]
            rgb = colour * (1 - t) + second * t
        else:
            rgb = flat_paint(rng, colour)(u / 2, v / 2)
        a = alpha[ys, xs, None]
        image[ys, xs] = image[ys, xs] * (1 - a) + rgb * a


# ---------------------------------------------------------------- one image

def plan(rng, index: int, offset: float):
    """Kind of image (by a low-discrepancy sequence, so even a dozen images mix the kinds), its
    objects as (class id, area fraction) and whether the background is cluttered."""
    r = (offset + index * GOLDEN) % 1.0
    n_cls = len(CLASS_NAMES) - 1
    loguniform = lambda lo, hi: float(np.exp(rng.uniform(np.log(lo), np.log(hi))))  # noqa: E731
    if r < SIMPLE_FRACTION:
        return [(int(rng.integers(1, n_cls + 1)), loguniform(0.06, 0.5))], False
    if r < SIMPLE_FRACTION + SINGLE_CLUTTER_FRACTION:
        cls = int(rng.integers(1, n_cls + 1))
        if rng.random() < 0.3:
            return [(cls, loguniform(0.05, 0.22)), (cls, loguniform(0.05, 0.22))], True
        return [(cls, loguniform(0.05, 0.4))], True
    classes = rng.choice(np.arange(1, n_cls + 1), size=2 if rng.random() < 0.7 else 3, replace=False)
    objects = [(int(c), loguniform(0.04, 0.28)) for c in classes]
    if rng.random() < 0.25:
        objects.append((objects[0][0], loguniform(0.04, 0.18)))
    objects.sort(key=lambda o: -o[1])  # large ones behind
    return objects, rng.random() < 0.6


def ignore_band(label: np.ndarray, width: int = IGNORE_WIDTH) -> np.ndarray:
    """Pixels within the `width`-pixel strip along every border between two labels."""
    return maximum_filter(label, size=width + 1) != minimum_filter(label, size=width + 1)


def draw_image(seed: int, split: str, index: int, size: int):
    """Everything about one image, from its own generator: (RGB uint8, mask, part mask, record)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    offset = np.random.default_rng([seed, SPLITS[split]]).random()
    objects, cluttered = plan(rng, index, offset)
    h, w = (int(round(size * rng.uniform(0.75, 1.125))) for _ in range(2))
    scene = CLASS_SCENE[CLASS_NAMES[objects[0][0]]] if rng.random() < 0.5 else str(rng.choice(list(SCENES)))
    image = clean_background(rng, (h, w), scene)
    avoid = None if cluttered else image.reshape(-1, 3).mean(0)
    if cluttered:
        clutter(rng, image, scene)

    instance = np.full((h, w), -1, np.int16)
    placed = []
    for cls, fraction in objects:
        found = place(rng, cls, fraction, (h, w), instance, placed, avoid)
        if found is not None:
            placed.append(found[0])
            instance = found[1]
    if not placed:
        raise RuntimeError(f"{split}_{index:05d}: no object could be placed")

    label = np.zeros((h, w), np.uint8)
    part = np.zeros((h, w), np.uint8)
    for j, obj in enumerate(placed):
        prem, alpha = np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.float32)
        for layer, a in zip(obj.layers, obj.alphas, strict=True):
            ys, xs = np.nonzero(a)
            u, v = obj.pose.inverse(xs.astype(np.float32), ys.astype(np.float32))
            aa = a[ys, xs]
            prem[ys, xs] = prem[ys, xs] * (1 - aa[:, None]) + layer.paint(u, v) * aa[:, None]
            alpha[ys, xs] = alpha[ys, xs] * (1 - aa) + aa
        image = image * (1 - alpha[..., None]) + prem
        label[instance == j] = obj.cls
        part[(instance == j) & obj.head] = obj.cls

    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 0.8))
    image = image * 255 + rng.normal(0, rng.uniform(2, 5), image.shape)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    band = ignore_band(label)
    mask = np.where(band, IGNORE, label).astype(np.uint8)
    part = np.where(band, IGNORE, part).astype(np.uint8)
    classes = sorted({obj.cls for obj in placed})
    simple = len(placed) == 1 and not cluttered
    record = {"id": f"{split}_{index:05d}", "split": split, "classes": classes, "objects": len(placed),
              "simple": simple, "cluttered": bool(cluttered), "scene": scene}
    return image, mask, part, record


def write_image(root: Path, seed: int, split: str, index: int, size: int) -> dict:
    cv2.setNumThreads(1)
    image, mask, part, record = draw_image(seed, split, index, size)
    id_ = record["id"]
    buf = _io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    write_bytes(root / "JPEGImages" / f"{id_}.jpg", buf.getvalue())
    write_mask(root / "SegmentationClassAug" / f"{id_}.png", mask)
    write_mask(root / "SegmentationPart" / f"{id_}.png", part)
    present = np.unique(mask[(mask > 0) & (mask != IGNORE)])
    if present.tolist() != record["classes"]:
        raise RuntimeError(f"{id_}: classes in the mask {present.tolist()} differ from those drawn {record['classes']}")
    return record


def _write_task(task) -> dict:
    return write_image(*task)


# ---------------------------------------------------------------- the whole dataset

def generate(out, seed: int = 0, n_train: int = 400, n_val: int = 100, size: int = 256,
             workers: int | None = None, force: bool = False) -> dict:
    """Write the dataset to `out` and return its summary (the content of dataset.json).

    Skipped (the existing summary is returned) when `out/dataset.json` was written with the same
    arguments by this version of the generator, unless `force`.
    """
    root = Path(out)
    if n_train < 1 or n_val < 0 or size < 32:
        raise ValueError(f"need n_train >= 1, n_val >= 0 and size >= 32, got {n_train}, {n_val}, {size}")
    config = {"seed": int(seed), "n_train": int(n_train), "n_val": int(n_val), "size": int(size), "version": VERSION}
    summary_path = root / "dataset.json"
    if summary_path.is_file() and not force:
        try:
            summary = read_json(summary_path)
        except (OSError, ValueError):
            summary = {}
        if summary.get("config") == config:
            print(f"{root}: synthetic dataset already generated with {config}; skipping")
            return summary
    if summary_path.exists():
        summary_path.unlink()  # the folder is unfinished until the new summary lands

    tasks = [(root, seed, split, i, size) for split, n in (("train", n_train), ("val", n_val)) for i in range(n)]
    workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, workers)
    t0 = time.time()
    if workers == 1:
        records = [_write_task(t) for t in tqdm(tasks, desc="synthetic", unit="img")]
    else:
        with process_pool(workers) as pool:  # spawned, one thread each, dying with this process
            records = list(tqdm(pool.map(_write_task, tasks, chunksize=4), total=len(tasks),
                                desc="synthetic", unit="img"))

    ids = {r["id"] for r in records}
    for sub in ("JPEGImages", "SegmentationClassAug", "SegmentationPart"):  # leftovers of a larger dataset
        for path in (root / sub).iterdir():
            if ID_PATTERN.match(path.name) and path.stem not in ids:
                path.unlink()
    lists = root / "ImageSets" / "Segmentation"
    train = [r["id"] for r in records if r["split"] == "train"]
    val = [r["id"] for r in records if r["split"] == "val"]
    for name, split_ids in (("train", train), ("train_aug", train), ("val", val)):
        write_bytes(lists / f"{name}.txt", "".join(f"{i}\n" for i in split_ids).encode())
    write_bytes(root / "class_names.txt", "".join(f"{n}\n" for n in CLASS_NAMES).encode())
    labels = {}
    for r in records:
        label = np.zeros(len(CLASS_NAMES) - 1, np.float32)
        label[np.asarray(r["classes"]) - 1] = 1
        labels[r["id"]] = label
    write_npy(root / "cls_labels.npy", labels)

    summary = {"config": config, "classes": list(CLASS_NAMES), "splits": {}}
    for split in ("train", "val"):
        rs = [r for r in records if r["split"] == split]
        summary["splits"][split] = {
            "images": len(rs),
            "simple": sum(r["simple"] for r in rs),
            "complex": sum(not r["simple"] for r in rs),
            "multi_label": sum(len(r["classes"]) > 1 for r in rs),
            "cluttered": sum(r["cluttered"] for r in rs),
            "images_per_class": {CLASS_NAMES[c]: sum(c in r["classes"] for r in rs)
                                 for c in range(1, len(CLASS_NAMES))},
            "simple_ids": [r["id"] for r in rs if r["simple"]],
        }
    write_json(summary_path, summary)
    n = len(records)
    print(f"{root}: {n} images ({len(train)} train, {len(val)} val) in {time.time() - t0:.1f}s "
          f"with {workers} worker(s)")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.data.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"), help="dataset folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400, help="number of training images")
    parser.add_argument("--val", type=int, default=100, help="number of validation images")
    parser.add_argument("--size", type=int, default=256, help="typical image side (sides vary 0.75-1.125x)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    parser.add_argument("--force", action="store_true", help="regenerate even if dataset.json matches")
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 0 or args.size < 32:
        parser.error("need --train >= 1, --val >= 0 and --size >= 32")
    generate(args.out, args.seed, args.train, args.val, args.size, args.workers, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
