"""Procedural scenes for the built-in synthetic data sets (no download, deterministic).

Every generator takes a ``numpy.random.Generator`` and the image size and returns numpy
arrays; the same generator state always gives the same scene.

* :func:`depth_scene`: piecewise-planar depth (a sloped background and convex polygons /
  ellipses at different depths, painted far to near) with an RGB guide whose colour edges
  coincide with the depth edges; inside each region the colour has shading, stripes and
  noise that do *not* follow the depth, so a guided upsampler beats bilinear but must
  learn to ignore texture.
* :func:`video_scene`: the depth scenes in motion (T frames): objects sliding at their own
  sub-pixel to few-pixel velocities and drifting in depth over a panning background, for
  video joint upsampling.
* :func:`seg_scene`: objects of ``num_classes - 1`` classes on a textured background.
  Each class has its own hue and stripe pattern (with jitter), so the class can be read
  from local appearance; optional ignore band (255) along object boundaries like VOC.
* :func:`seg_scene` with ``instances=True``: region ids instead of classes (every object
  its own id and random colour), the label DistLoss/Im2parity training wants.
"""

from __future__ import annotations

import colorsys
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["shape_mask", "depth_scene", "video_scene", "seg_scene", "boundary_band"]


def _grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def _random_shape(rng: np.random.Generator, h: int, w: int, kind: str = "any",
                  min_size: float = 0.12, max_size: float = 0.4) -> Dict[str, Any]:
    """The parameters of a random convex polygon (3-7 corners) or rotated ellipse (see
    :func:`shape_mask`), in pixels."""
    s = float(min(h, w))
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    if kind == "any":
        kind = "ellipse" if rng.random() < 0.5 else "polygon"
    if kind == "ellipse":
        ry, rx = rng.uniform(min_size, max_size, size=2) * s
        return {"kind": kind, "cy": cy, "cx": cx, "ry": ry, "rx": rx, "t": rng.uniform(0, np.pi)}
    n = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    radius = rng.uniform(min_size, max_size) * s * 1.3
    radii = radius * rng.uniform(0.7, 1.0, size=n)
    return {"kind": kind, "vy": cy + radii * np.sin(angles), "vx": cx + radii * np.cos(angles)}


def _moved(shape: Dict[str, Any], dy: float, dx: float) -> Dict[str, Any]:
    """``shape`` translated by (dy, dx) pixels."""
    keys = ("cy", "cx") if shape["kind"] == "ellipse" else ("vy", "vx")
    return {**shape, keys[0]: shape[keys[0]] + dy, keys[1]: shape[keys[1]] + dx}


def _inside(shape: Dict[str, Any], yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Which pixels of the grid (yy, xx) lie in ``shape``, bool."""
    if shape["kind"] == "ellipse":
        t, rx, ry = shape["t"], shape["rx"], shape["ry"]
        dy, dx = yy - shape["cy"], xx - shape["cx"]
        u = (dx * np.cos(t) + dy * np.sin(t)) / rx
        v = (-dx * np.sin(t) + dy * np.cos(t)) / ry
        return u * u + v * v <= 1.0
    vy, vx = shape["vy"], shape["vx"]
    n = len(vy)
    inside = np.ones(yy.shape, bool)
    for i in range(n):  # convex and counter-clockwise: inside = left of every edge
        j = (i + 1) % n
        ey, ex = vy[j] - vy[i], vx[j] - vx[i]
        inside &= (ex * (yy - vy[i]) - ey * (xx - vx[i])) >= 0
    return inside


def shape_mask(rng: np.random.Generator, h: int, w: int, kind: str = "any",
               min_size: float = 0.12, max_size: float = 0.4) -> np.ndarray:
    """A random filled convex polygon (3-7 corners) or rotated ellipse, ``H x W`` bool.
    Sizes are fractions of ``min(H, W)``; the centre may lie near the border."""
    return _inside(_random_shape(rng, h, w, kind, min_size, max_size), *_grid(h, w))


def _colour(rng: np.random.Generator, taken: List[np.ndarray], min_dist: float = 0.35) -> np.ndarray:
    """A random RGB colour in [0.1, 0.9] at least ``min_dist`` from the ones ``taken``."""
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.uniform(0.1, 0.9, size=3).astype(np.float32)
        d = min((float(np.linalg.norm(c - t)) for t in taken), default=9.0)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _stripe_field(rng: np.random.Generator, freq: float, amp: float,
                  angle=None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Stripes of a random orientation (or ``angle``) and phase, as a function of the pixel
    coordinates (so a texture can move with its surface)."""
    t = rng.uniform(0, np.pi) if angle is None else angle
    phase = rng.uniform(0, 2 * np.pi)

    def field(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return (amp * np.sin(2 * np.pi * freq * (xx * np.cos(t) + yy * np.sin(t)) + phase)
                ).astype(np.float32)

    return field


def _stripes(rng: np.random.Generator, h: int, w: int, freq: float, amp: float,
             angle=None) -> np.ndarray:
    return _stripe_field(rng, freq, amp, angle)(*_grid(h, w))


def depth_scene(rng: np.random.Generator, h: int, w: int, *, n_shapes: Tuple[int, int] = (3, 7),
                texture: float = 0.06, noise: float = 0.02, near: float = 1.0, far: float = 10.0
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (guide ``3 x H x W`` RGB in [0, 1], depth ``1 x H x W`` in metres
    (``near``..``far``), region ids ``H x W`` int).  Depth is smooth (planar) inside
    regions and jumps at their edges, where the colour changes too."""
    yy, xx = _grid(h, w)
    yn, xn = yy / max(h - 1, 1), xx / max(w - 1, 1)
    span = far - near
    # background: a far, gently sloped plane (a wall seen at an angle)
    depth = (near + span * rng.uniform(0.75, 0.95)
             + span * 0.08 * (rng.uniform(-1, 1) * xn + rng.uniform(-1, 1) * yn)).astype(np.float32)
    region = np.zeros((h, w), np.int32)
    colours = [_colour(rng, [])]
    k = int(rng.integers(n_shapes[0], n_shapes[1] + 1))
    levels = np.sort(rng.uniform(0.05, 0.7, size=k))[::-1]  # painted far to near
    for i, level in enumerate(levels, start=1):
        mask = shape_mask(rng, h, w)
        plane = near + span * (level + 0.1 * (rng.uniform(-1, 1) * xn + rng.uniform(-1, 1) * yn))
        depth = np.where(mask, plane, depth).astype(np.float32)
        region[mask] = i
        colours.append(_colour(rng, colours))
    depth = np.clip(depth, near, far)
    guide = np.empty((3, h, w), np.float32)
    table = np.stack(colours)  # (k+1) x 3
    for c in range(3):
        guide[c] = table[region, c]
    # shading varies smoothly with depth (closer = brighter), texture and noise do not
    shade = 1.0 - 0.25 * (depth - near) / span
    guide *= shade[None]
    for i in range(k + 1):
        m = region == i
        if m.any():
            guide[:, m] += _stripes(rng, h, w, rng.uniform(0.08, 0.25), texture)[m][None]
    guide += rng.normal(0.0, noise, size=guide.shape).astype(np.float32)
    return np.clip(guide, 0.0, 1.0), depth[None].astype(np.float32), region


def video_scene(rng: np.random.Generator, frames: int, h: int, w: int, *,
                n_shapes: Tuple[int, int] = (3, 6), speed: Tuple[float, float] = (0.25, 1.5),
                pan: float = 0.5, drift: float = 0.01, texture: float = 0.06, noise: float = 0.02,
                near: float = 1.0, far: float = 10.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One moving scene of ``frames`` frames: (guide ``3 x T x H x W`` RGB in [0, 1], depth
    ``1 x T x H x W`` in metres (``near``..``far``), region ids ``T x H x W`` int).

    The scenes of :func:`depth_scene`, set in motion: convex polygons and ellipses, each a
    slightly tilted plane with its own colour and stripe texture, slide over a far sloped
    background.  Every object moves with its own constant velocity, ``speed`` pixels per
    frame (uniform in the range) in a random direction, and drifts in depth (by up to
    ``drift`` times the depth span per frame; painted far to near in every frame, so
    objects may pass in front of each other); the camera pans by up to ``pan`` pixels per
    frame, moving the background and its texture.  The speeds are sub-pixel to a few
    pixels, so a low-res sampling grid sees every edge at a different place in each frame:
    what a temporal upsampler can gather.  Colour edges coincide with depth edges in every
    frame, texture moves with its surface, shading follows depth, and the noise is new in
    every frame.
    """
    yy, xx = _grid(h, w)
    sy, sx = 1.0 / max(h - 1, 1), 1.0 / max(w - 1, 1)
    span = far - near
    # background: a far, gently sloped plane (a wall seen at an angle) behind a panning camera
    bg_level = rng.uniform(0.75, 0.95)
    bg_slope = 0.08 * rng.uniform(-1, 1, size=2)
    pan_velocity = rng.uniform(-pan, pan, size=2)
    colours = [_colour(rng, [])]
    textures = [_stripe_field(rng, rng.uniform(0.08, 0.25), texture)]
    shapes, levels, slopes, drifts, velocities = [], [], [], [], []
    k = int(rng.integers(n_shapes[0], n_shapes[1] + 1))
    for _ in range(k):
        shapes.append(_random_shape(rng, h, w))
        levels.append(rng.uniform(0.05, 0.7))
        slopes.append(0.1 * rng.uniform(-1, 1, size=2))
        drifts.append(rng.uniform(-drift, drift))
        direction, magnitude = rng.uniform(0, 2 * np.pi), rng.uniform(*speed)
        velocities.append(magnitude * np.array([np.sin(direction), np.cos(direction)]))
        colours.append(_colour(rng, colours))
        textures.append(_stripe_field(rng, rng.uniform(0.08, 0.25), texture))
    table = np.stack(colours)  # (k+1) x 3

    guide = np.empty((3, frames, h, w), np.float32)
    depth = np.empty((1, frames, h, w), np.float32)
    region = np.empty((frames, h, w), np.int32)
    for f in range(frames):
        # every surface is evaluated in its own moving coordinates: (yy - dy, xx - dx)
        dy, dx = pan_velocity * f
        d = (near + span * bg_level + span * (bg_slope[0] * (yy - dy) * sy
                                             + bg_slope[1] * (xx - dx) * sx)).astype(np.float32)
        reg = np.zeros((h, w), np.int32)
        tex = textures[0](yy - dy, xx - dx)
        now = [float(np.clip(lv + dr * f, 0.02, 0.9)) for lv, dr in zip(levels, drifts)]
        for i in np.argsort(now)[::-1]:  # far to near
            dy, dx = velocities[i] * f
            mask = _inside(_moved(shapes[i], dy, dx), yy, xx)
            plane = near + span * (now[i] + slopes[i][0] * (yy - dy) * sy
                                   + slopes[i][1] * (xx - dx) * sx)
            d = np.where(mask, plane, d).astype(np.float32)
            reg[mask] = i + 1
            tex = np.where(mask, textures[i + 1](yy - dy, xx - dx), tex)
        d = np.clip(d, near, far)
        shade = 1.0 - 0.25 * (d - near) / span
        frame = table[reg].transpose(2, 0, 1) * shade[None] + tex[None]
        frame += rng.normal(0.0, noise, size=frame.shape).astype(np.float32)
        guide[:, f] = np.clip(frame, 0.0, 1.0)
        depth[0, f] = d
        region[f] = reg
    return guide, depth, region


def boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """``H x W`` bool: pixels within ``width`` pixels (Chebyshev) of a label change."""
    if width <= 0:
        return np.zeros(label.shape, bool)
    edge = np.zeros(label.shape, bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:-1, :] |= label[1:, :] != label[:-1, :]
    if width > 1:
        t = torch.from_numpy(edge.astype(np.float32))[None, None]
        edge = F.max_pool2d(t, 2 * (width - 1) + 1, stride=1, padding=width - 1)[0, 0].numpy() > 0
    return edge


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1)), np.float32)


def seg_scene(rng: np.random.Generator, h: int, w: int, num_classes: int, *,
              n_objects: Tuple[int, int] = (1, 4), ignore_border: int = 0, ignore_label: int = 255,
              instances: bool = False, noise: float = 0.03) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: (image ``3 x H x W`` RGB 0-255 float32, label ``H x W`` float32).

    Classes (``instances=False``): class c >= 1 has hue ``(c-1)/(num_classes-1)`` and its own
    stripe frequency and orientation; class 0 is a low-saturation noisy background.
    Instances: objects are numbered 1, 2, ... in painting order (0 = background), each with
    a random colour; ``num_classes`` bounds the number of objects.
    Pixels within ``ignore_border`` of a label change become ``ignore_label``.
    """
    yy, xx = _grid(h, w)
    label = np.zeros((h, w), np.int32)
    bg = _hsv(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.7))
    image = np.empty((3, h, w), np.float32)
    image[:] = bg[:, None, None]
    image += _stripes(rng, h, w, 0.03, 0.05)[None]
    image += rng.normal(0.0, 0.06, size=(1, h, w)).astype(np.float32)
    lo, hi = n_objects
    count = int(rng.integers(lo, hi + 1))
    if instances:
        count = min(count, num_classes - 1)
    taken = [bg]
    for i in range(1, count + 1):
        mask = shape_mask(rng, h, w)
        if instances:
            ident = i
            colour = _colour(rng, taken, 0.3)
            pattern = _stripes(rng, h, w, rng.uniform(0.05, 0.2), 0.05)
        else:
            ident = int(rng.integers(1, num_classes))
            hue = (ident - 1) / max(num_classes - 1, 1) + rng.uniform(-0.03, 0.03)
            colour = _hsv(hue, rng.uniform(0.6, 0.95), rng.uniform(0.55, 0.95))
            freq = 0.04 + 0.3 * ((ident * 7) % num_classes) / num_classes
            pattern = _stripes(rng, h, w, freq, 0.08, angle=np.pi * ((ident * 3) % 5) / 5)
        taken.append(colour)
        fill = colour[:, None, None] * (1.0 + pattern[None]) * np.float32(rng.uniform(0.85, 1.1))
        image = np.where(mask[None], fill, image)
        label[mask] = ident
    image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0) * 255.0
    out = label.astype(np.float32)
    if ignore_border > 0:
        out[boundary_band(label, ignore_border)] = ignore_label
    return image.astype(np.float32), out
