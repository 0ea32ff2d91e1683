"""A policy client for a robot computer: numpy, msgpack and websockets only (no torch).

    from il_policies.serving.client import PolicyClient

    with PolicyClient("ws://127.0.0.1:8765") as policy:
        policy.reset()
        action = policy.select_action({"state": state})   # numpy in, numpy out
"""

from __future__ import annotations

from typing import Any

import numpy as np
from websockets.sync.client import connect

from il_policies.serving.protocol import DEFAULT_MAX_MESSAGE_BYTES, pack, unpack


class PolicyServerError(RuntimeError):
    """The server refused a request (its one-sentence reason is the message)."""


class PolicyClient:
    def __init__(self, url: str = "ws://127.0.0.1:8765", timeout: float = 30.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        # Entered by hand (not `with`) so that the client object owns the connection's lifetime.
        self._connection = connect(url, open_timeout=timeout, max_size=max_message_bytes)
        self._socket = self._connection.__enter__()
        self._timeout = timeout

    def _call(self, method: str, **fields: Any) -> Any:
        self._socket.send(pack({"method": method, **fields}))
        reply = unpack(self._socket.recv(timeout=self._timeout))
        if not reply.get("ok"):
            raise PolicyServerError(reply.get("error", "the server gave no reason"))
        return reply.get("result")

    def metadata(self) -> dict[str, Any]:
        return self._call("metadata")

    def reset(self) -> None:
        self._call("reset")

    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self._call("select_action", obs=obs)

    def predict_action_chunk(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self._call("predict_action_chunk", obs=obs)

    def close(self) -> None:
        self._connection.__exit__(None, None, None)

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
