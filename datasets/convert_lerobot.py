"""Convert a local LeRobotDataset directory (v2.0, v2.1 or v3.0) into a trajectory store (see datasets/README.md).

    python datasets/convert_lerobot.py SRC_DIR OUT.zarr [--episodes 0-49] [--overwrite]

Exit status 2 with one line on stderr if the input is unusable.
"""

import argparse
import importlib.util
import pathlib
import sys

if importlib.util.find_spec("il_policies") is None:  # not installed with `pip install -e .`: run from a checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from il_policies.data.codecs import IMAGE_CODEC_HELP  # noqa: E402
from il_policies.data.lerobot_import import convert_lerobot, parse_episodes  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert a local LeRobotDataset directory into a trajectory store.")
    p.add_argument("src", help="LeRobotDataset directory (holds meta/info.json)")
    p.add_argument("out", help="output .zarr store")
    p.add_argument("--episodes", help="episode indices to convert, e.g. 0-49 or 3,5,7-9 (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at OUT")
    p.add_argument("--image-codec", help=IMAGE_CODEC_HELP)
    a = p.parse_args(argv)
    try:
        episodes = None if a.episodes is None else parse_episodes(a.episodes)
        store = convert_lerobot(a.src, a.out, episodes=episodes, overwrite=a.overwrite, image_codec=a.image_codec)
    except ValueError as e:  # StoreError and friends
        print(str(e), file=sys.stderr)
        return 2
    print(f"{store.path}: {store.n_episodes} episodes, {store.n_steps} steps, task {store.task!r}, "
          f"fps {store.fps:g}, keys {', '.join(f'{k} ({s.kind})' for k, s in store.keys.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
