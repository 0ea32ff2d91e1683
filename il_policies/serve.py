"""Serve a checkpoint to robot clients: `python -m il_policies.serve checkpoint=PATH [host=127.0.0.1] [port=8765]`.

Binds to loopback unless `host=` says otherwise. Options: device=cpu|cuda, max_message_mb=16,
backend=torch|onnxruntime|openvino, accel=false, compile=false, num_threads=null (see `load_policy`).
"""

import asyncio
import sys

from omegaconf import OmegaConf

from il_policies.checkpoint import CheckpointError
from il_policies.policies import load_policy
from il_policies.serving.protocol import DEFAULT_PORT
from il_policies.serving.server import PolicyServer


def main(argv: list[str]) -> None:
    options = OmegaConf.merge(
        {"checkpoint": None, "host": "127.0.0.1", "port": DEFAULT_PORT, "device": "cpu", "max_message_mb": 16, "backend": "torch",
         "accel": False, "compile": False, "num_threads": None},
        OmegaConf.from_dotlist(argv),
    )
    if not options.checkpoint:
        sys.exit("usage: python -m il_policies.serve checkpoint=PATH [host=127.0.0.1] [port=8765] [device=cpu]")
    try:
        policy = load_policy(options.checkpoint, device=options.device, backend=options.backend, accel=options.accel,
                             compile=options.compile, num_threads=options.num_threads)
    except (CheckpointError, ValueError) as error:
        sys.exit(f"error: {error}")
    server = PolicyServer(policy, options.host, int(options.port), int(options.max_message_mb * 1024 * 1024))

    async def run():
        task = asyncio.create_task(server.serve())
        while not server._ready.is_set():
            await asyncio.sleep(0.01)
        print(f"serving {policy.name} from {options.checkpoint} ({options.backend}) on ws://{server.host}:{server.port}", flush=True)
        await task

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
