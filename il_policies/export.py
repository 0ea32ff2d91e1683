"""Export a checkpoint's network to ONNX: `python -m il_policies.export checkpoint=PATH [out=policy.onnx]`.

The file holds the whole network (normalization included, a dynamic batch dimension) and, in its
metadata (`il_policies`, JSON), the observation schema, action bounds, windows and policy config,
so a robot computer can run it with onnxruntime alone (see the README, "Running on a robot").
Default `out`: next to the checkpoint (`best.pt` -> `best.onnx`), where `load_policy(...,
backend="onnxruntime")` looks for it.
"""

import sys
from pathlib import Path

from il_policies.accel.backends import cached_export
from il_policies.checkpoint import CheckpointError
from il_policies.policies import load_policy


def main(argv: list[str]) -> None:
    options = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    unknown = sorted(set(options) - {"checkpoint", "out"})
    if "checkpoint" not in options or unknown or len(options) != len(argv):
        sys.exit("usage: python -m il_policies.export checkpoint=PATH [out=PATH.onnx]")
    try:
        policy = load_policy(options["checkpoint"])
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    path = cached_export(policy, options["checkpoint"], options.get("out"))
    print(f"exported {policy.name} from {options['checkpoint']} to {path} ({Path(path).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1:])
