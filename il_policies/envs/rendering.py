"""Process-wide set-up for MuJoCo rendering; every simulator module imports this first.

- `MUJOCO_GL=egl`: the only backend that renders on a machine without a display (software EGL).
- triton is loaded before any GL library. torch's compiler stack (torch._dynamo, which diffusers
  imports) loads triton lazily; triton carries its own LLVM, and loading it after Mesa's software
  EGL has loaded the system LLVM crashes the process (segmentation fault). Loaded first, both work.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only torch builds come without triton: nothing to order
    pass
