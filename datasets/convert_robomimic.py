"""Convert a robomimic HDF5 demo file into a trajectory store (see datasets/README.md).

    python datasets/convert_robomimic.py IN.hdf5 OUT.zarr [--overwrite] [--obs-keys k1,k2] [--fps F] [--filter-key NAME]

Exit status 2 with one line on stderr if the input is unusable.
"""

import argparse
import pathlib
import sys

try:  # installed with `pip install -e .`; otherwise run from a checkout
    import il_policies  # noqa: F401
except ImportError:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from il_policies.data.codecs import IMAGE_CODEC_HELP  # noqa: E402
from il_policies.data.robomimic_import import convert_robomimic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert a robomimic HDF5 demo file into a trajectory store.")
    p.add_argument("hdf5", help="robomimic .hdf5 file")
    p.add_argument("out", help="output .zarr store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at OUT")
    p.add_argument("--obs-keys", help="comma-separated obs keys to keep (default: all)")
    p.add_argument("--fps", type=float, help="default: env_kwargs control_freq, else 20")
    p.add_argument("--filter-key", help="convert only the demos in mask/NAME")
    p.add_argument("--image-codec", help=IMAGE_CODEC_HELP)
    a = p.parse_args(argv)
    obs_keys = None if a.obs_keys is None else [k.strip() for k in a.obs_keys.split(",") if k.strip()]
    try:
        store = convert_robomimic(a.hdf5, a.out, obs_keys=obs_keys, fps=a.fps,
                                  filter_key=a.filter_key, overwrite=a.overwrite, image_codec=a.image_codec)
    except ValueError as e:  # StoreError and friends
        print(str(e), file=sys.stderr)
        return 2
    print(f"{store.path}: {store.n_episodes} episodes, {store.n_steps} steps, task {store.task!r}, "
          f"fps {store.fps:g}, keys {', '.join(f'{k} ({s.kind})' for k, s in store.keys.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
