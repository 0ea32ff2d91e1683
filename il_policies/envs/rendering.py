"""Process-wide set-up for MuJoCo rendering; every simulator module imports this first.

- `MUJOCO_GL=egl`: the only backend that renders on a machine without a display (software EGL).
- triton is loaded before any GL library. torch's compiler stack (torch._dynamo, which diffusers
  imports) loads triton lazily; triton carries its own LLVM, and loading it after Mesa's software
  EGL has loaded the system LLVM crashes the process (segmentation fault). Loaded first, both work.

It also holds the offscreen renderer set-up the simulator envs share (`make_renderer`,
`close_renderer`), and closes the renderers still open when the interpreter exits.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only torch builds come without triton: nothing to order
    pass

import atexit  # noqa: E402
import weakref  # noqa: E402

import mujoco  # noqa: E402  (after MUJOCO_GL and triton, see above)

__all__ = ["close_renderer", "make_renderer"]

# Renderers still open at exit are closed before the EGL display goes away (otherwise MuJoCo's
# `Renderer.__del__` prints EGL errors at interpreter shutdown).
_LIVE_RENDERERS: weakref.WeakSet = weakref.WeakSet()
_atexit_registered = False


def close_renderer(renderer: mujoco.Renderer) -> None:
    """Close `renderer`, best effort (it may outlive the EGL display at shutdown)."""
    try:
        renderer.close()
    except Exception:  # EGL already torn down: drop the handles so __del__ does not retry noisily
        renderer._gl_context = None
        renderer._mjr_context = None


def _close_live_renderers() -> None:
    for renderer in list(_LIVE_RENDERERS):
        close_renderer(renderer)


def _track(renderer: mujoco.Renderer) -> None:
    # mujoco.egl registers eglTerminate with atexit when the first context is made; registering after
    # that makes this hook run first (atexit is LIFO), so open renderers are freed while EGL is alive.
    global _atexit_registered
    _LIVE_RENDERERS.add(renderer)
    if not _atexit_registered:
        atexit.register(_close_live_renderers)
        _atexit_registered = True


def make_renderer(model: mujoco.MjModel, height: int, width: int, skybox: bool = True) -> mujoco.Renderer:
    """A `mujoco.Renderer` for `model` without shadows, reflections or multisampling (and without the
    skybox unless `skybox`), closed at exit if still open. Changes `model`'s visual options."""
    # The shadow map and multisample settings size the offscreen buffers, so they must be set (and the
    # buffer made large enough) before the renderer makes its GL context.
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, int(width))
    model.vis.global_.offheight = max(model.vis.global_.offheight, int(height))
    renderer = mujoco.Renderer(model, height=int(height), width=int(width))
    flags = renderer.scene.flags
    flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    if not skybox:
        flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0
    _track(renderer)
    return renderer
