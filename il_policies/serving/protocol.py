"""The wire format: msgpack maps; numpy arrays as {"__ndarray__": [dtype, shape, raw bytes]}.

Requests: {"method": "metadata" | "reset" | "select_action" | "predict_action_chunk", "obs": {key: array}}.
Replies: {"ok": true, "result": ...} or {"ok": false, "error": "one sentence"}.
No pickle anywhere: a message can only ever decode to maps, lists, scalars, strings and arrays.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

DEFAULT_PORT = 8765
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a few 480x640x3 camera frames
_ARRAY = "__ndarray__"
_ALLOWED_DTYPES = {"bool", "uint8", "int8", "int16", "uint16", "int32", "int64", "float16", "float32", "float64"}


class ProtocolError(ValueError):
    """A message that is not valid msgpack or not a well-formed request/array."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        return {_ARRAY: [array.dtype.name, list(array.shape), array.tobytes()]}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    if _ARRAY not in obj:
        return obj
    try:
        dtype, shape, data = obj[_ARRAY]
        if dtype not in _ALLOWED_DTYPES:
            raise ProtocolError(f"arrays of dtype {dtype!r} are not accepted")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, owning its memory
    except ProtocolError:
        raise
    except Exception as error:
        raise ProtocolError(f"malformed array ({error})") from None


def pack(message: Any) -> bytes:
    return msgpack.packb(message, default=_encode, use_bin_type=True)


def unpack(payload: bytes) -> Any:
    if not isinstance(payload, (bytes, bytearray)):
        raise ProtocolError("messages must be binary msgpack frames, not text")
    try:
        return msgpack.unpackb(payload, object_hook=_decode, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as error:
        raise ProtocolError(f"not a valid msgpack message ({type(error).__name__})") from None
