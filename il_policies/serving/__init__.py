"""Serving a policy to a robot computer that cannot run torch: websockets + msgpack.

`protocol.py` and `client.py` need only numpy, msgpack and websockets (no torch); `server.py`
runs next to the policy.
"""
