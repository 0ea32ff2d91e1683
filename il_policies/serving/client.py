"""A policy client for a robot computer: numpy, msgpack and websockets only (no torch).

    from il_policies.serving.client import PolicyClient

    with PolicyClient("ws://127.0.0.1:8765") as policy:
        policy.reset()
        action = policy.select_action({"state": state})   # numpy in, numpy out

`PolicyClient(url, asynchronous=True)` keeps the action plan on the robot side: `select_action`
answers from the current chunk at once while the next chunk is requested from the server in a
background thread (`il_policies.chunk_executor.ChunkExecutor`; options such as `blend`,
`threshold`, `rate_hz` pass through), so a slow reply or a network hiccup drains the plan
instead of stalling the loop. It needs a policy with `n_obs_steps = 1` (the server sees only the
observations of the steps that request a chunk).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from websockets.sync.client import connect

from il_policies.serving.protocol import DEFAULT_MAX_MESSAGE_BYTES, pack, unpack


class PolicyServerError(RuntimeError):
    """The server refused a request (its one-sentence reason is the message)."""


class PolicyClient:
    def __init__(self, url: str = "ws://127.0.0.1:8765", timeout: float = 30.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 asynchronous: bool = False, **executor_options: Any):
        # Entered by hand (not `with`) so that the client object owns the connection's lifetime.
        self._connection = connect(url, open_timeout=timeout, max_size=max_message_bytes)
        self._socket = self._connection.__enter__()
        self._timeout = timeout
        self._executor = None
        if asynchronous:
            from il_policies.chunk_executor import ChunkExecutor  # numpy only

            meta = self.metadata()
            if meta["n_obs_steps"] != 1:
                self.close()
                raise ValueError(f"an asynchronous client needs a policy with n_obs_steps = 1; the server's has {meta['n_obs_steps']}")
            rate_hz = executor_options.pop("rate_hz", None) or meta.get("fps")
            self._executor = ChunkExecutor(_ServerChunks(self), rate_hz=rate_hz, **executor_options)

    def _call(self, method: str, **fields: Any) -> Any:
        self._socket.send(pack({"method": method, **fields}))
        reply = unpack(self._socket.recv(timeout=self._timeout))
        if not reply.get("ok"):
            raise PolicyServerError(reply.get("error", "the server gave no reason"))
        return reply.get("result")

    def metadata(self) -> dict[str, Any]:
        return self._call("metadata")

    def reset(self) -> None:
        if self._executor is not None:
            self._executor.reset()  # waits out the request in flight, then resets the server's episode
        else:
            self._call("reset")

    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self._executor is not None:
            return self._executor.select_action(obs)
        return self._call("select_action", obs=obs)

    def predict_action_chunk(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self._call("predict_action_chunk", obs=obs)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self._connection.__exit__(None, None, None)

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ServerChunks:
    """The server's policy as the ChunkExecutor drives it; only the executor's worker thread (or,
    between episodes, `reset`) talks to the server, so the connection is never used twice at once."""

    def __init__(self, client: PolicyClient):
        self.client = client

    def reset(self) -> None:
        self.client._call("reset")

    def observe(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return obs

    def predict_action_chunk(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.client._call("predict_action_chunk", obs=obs))[None]
