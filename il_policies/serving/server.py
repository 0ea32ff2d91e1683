"""The policy server: one policy's weights, one episode state per connected client.

Each connection gets `policy.episode_view()` (shared weights, its own observation history and
action queue). Requests are answered one at a time (a lock around the network: parallel calls
would only fight over the same CPU cores), in a worker thread so the event loop keeps accepting
connections. A malformed request gets an error reply; the connection and the server stay up.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from websockets.asyncio.server import serve

from il_policies.policies.observations import ObservationError
from il_policies.serving.protocol import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PORT, ProtocolError, pack, unpack

METHODS = ("metadata", "reset", "select_action", "predict_action_chunk")


class PolicyServer:
    def __init__(self, policy, host: str = "127.0.0.1", port: int = DEFAULT_PORT, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.policy = policy.eval()
        self.host, self.port, self.max_message_bytes = host, port, max_message_bytes
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def _answer(self, client_policy, payload) -> bytes:
        try:
            request = unpack(payload)
            if not isinstance(request, dict) or request.get("method") not in METHODS:
                raise ProtocolError(f"a request is a map with 'method' one of {list(METHODS)}")
            method = request["method"]
            with self._lock:
                if method == "metadata":
                    result: Any = client_policy.metadata
                elif method == "reset":
                    client_policy.reset()
                    result = None
                else:
                    obs = request.get("obs")
                    result = getattr(client_policy, method)(obs)
            return pack({"ok": True, "result": result})
        except (ProtocolError, ObservationError) as error:
            return pack({"ok": False, "error": str(error)})
        except Exception as error:  # the server must outlive any single bad request
            return pack({"ok": False, "error": f"{type(error).__name__}: {error}"})

    async def _handle(self, websocket) -> None:
        client_policy = self.policy.episode_view()
        async for payload in websocket:
            await websocket.send(await asyncio.to_thread(self._answer, client_policy, payload))

    async def serve(self) -> None:
        """Serve until `stop()`; the bound port is in `self.port` (pass port=0 for any free port)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        async with serve(self._handle, self.host, self.port, max_size=self.max_message_bytes) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stopped.wait()

    def start_in_thread(self) -> "PolicyServer":
        self._thread = threading.Thread(target=asyncio.run, args=(self.serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the policy server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
