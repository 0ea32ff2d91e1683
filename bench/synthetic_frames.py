"""Camera-like synthetic episodes for the dataset benchmarks (bench/large_store.py, bench/image_codecs.py).

Each episode is a 2-D tabletop seen from above: a textured table under uneven light (its colour,
grain and light differ per episode), a block pushed along a smooth path, a two-link arm whose end
effector follows it, soft shadows, and sensor noise (2 grey levels' standard deviation) as a real camera
adds. Not random noise, so compression behaves as on camera data; noisier than MuJoCo's renders,
which compress far better (bench/image_codecs.py shows both). State: end effector (x, y), block
(x, y); action: the end effector's next displacement.
"""

from __future__ import annotations

import numpy as np

from il_policies.data.schema import KeySpec


def keys(size: int) -> dict[str, KeySpec]:
    return {"image": KeySpec((size, size, 3), "uint8", "rgb"), "state": KeySpec((4,), "float32", "low_dim"),
            "action": KeySpec((2,), "float32", "action")}


def _capsule(px, py, ax, ay, bx, by):
    """Distance of pixels (H, W) to segments a-b, one per frame: (T, H, W)."""
    dx, dy = (bx - ax)[:, None, None], (by - ay)[:, None, None]
    rx, ry = px[None] - ax[:, None, None], py[None] - ay[:, None, None]
    t = np.clip((rx * dx + ry * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    return np.hypot(rx - t * dx, ry - t * dy)


def episode(seed: int, length: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    # the table: per-episode colour, wood grain, a light falling off from one corner
    colour = rng.uniform(0.35, 0.75, size=3).astype(np.float32)
    grain = 0.06 * np.sin(2 * np.pi * (rng.uniform(6, 14) * y + 0.15 * np.sin(2 * np.pi * 3 * x + rng.uniform(0, 6))))
    light_x, light_y = rng.uniform(0, 1, size=2)
    light = 1.1 - 0.45 * np.hypot(x - light_x, y - light_y)
    table = np.clip((colour[None, None] + grain[..., None]) * light[..., None], 0, 1).astype(np.float32)
    # the block's path and the end effector behind it (smooth, random per episode)
    t = np.linspace(0, 1, length, dtype=np.float32)
    start, goal = rng.uniform(0.25, 0.75, size=(2, 2)).astype(np.float32)
    wobble = 0.05 * np.sin(2 * np.pi * (t * rng.uniform(0.5, 1.5) + rng.uniform(0, 1)))
    block = start[None] + (goal - start)[None] * (3 * t**2 - 2 * t**3)[:, None] + wobble[:, None]
    direction = (goal - start) / max(np.linalg.norm(goal - start), 1e-3)
    effector = block - 0.09 * direction[None] + 0.01 * rng.standard_normal((length, 2)).cumsum(0) / np.sqrt(length)
    base = np.array([0.5, 1.05], np.float32)
    elbow = (base[None] + effector) / 2 + np.array([0.12, 0.0], np.float32)
    frames = np.repeat(table[None], length, axis=0)
    block_colour = rng.uniform(0.1, 0.9, size=3).astype(np.float32)
    half = rng.uniform(0.05, 0.08)
    inside = (np.abs(x[None] - block[:, 0, None, None]) < half) & (np.abs(y[None] - block[:, 1, None, None]) < half)
    shadow = (np.abs(x[None] - block[:, 0, None, None] - 0.02) < half + 0.01) & (np.abs(y[None] - block[:, 1, None, None] - 0.02) < half + 0.01)
    f32 = np.float32
    frames *= np.where(shadow, f32(0.7), f32(1.0))[..., None]
    frames = np.where(inside[..., None], block_colour, frames)
    for (ax, ay), (bx, by), width, shade in (((base[0], base[1]), elbow.T, 0.045, 0.55), (elbow.T, effector.T, 0.035, 0.75)):
        ax = np.broadcast_to(ax, (length,)).astype(np.float32)
        ay = np.broadcast_to(ay, (length,)).astype(np.float32)
        distance = _capsule(x, y, ax, ay, bx, by)
        frames *= np.where(_capsule(x - f32(0.025), y - f32(0.025), ax, ay, bx, by) < width, f32(0.75), f32(1.0))[..., None]
        arm = np.clip(f32(1.0) - distance / f32(width), f32(0), f32(1))  # shaded like a cylinder
        frames = np.where((distance < width)[..., None], (f32(shade) * (f32(0.6) + f32(0.4) * np.sqrt(arm)))[..., None], frames)
    # sensor noise: uniform in [-3, 3] grey levels (standard deviation 2), cheaper to draw than Gaussian
    noisy = np.round(frames * f32(255)).astype(np.int16) + rng.integers(-3, 4, size=frames.shape, dtype=np.int16)
    image = np.clip(noisy, 0, 255).astype(np.uint8)
    state = np.concatenate([effector, block], axis=1).astype(np.float32)
    action = np.diff(effector, axis=0, append=effector[-1:]).astype(np.float32) * 20
    return {"image": image, "state": state, "action": action}
