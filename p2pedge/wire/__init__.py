"""Pure wire formats: length-prefixed frames, msgpack messages, typed tensors.

Nothing here imports trio or onnxruntime; every decoder checks its limits before it
allocates, and raises :class:`p2pedge.errors.RemoteProtocolError` on bytes a peer sent.
"""

from p2pedge.wire.framing import DEFAULT_MAX_FRAME as DEFAULT_MAX_FRAME
from p2pedge.wire.framing import FrameDecoder as FrameDecoder
from p2pedge.wire.framing import encode_frame as encode_frame
from p2pedge.wire.messages import pack as pack
from p2pedge.wire.messages import unpack as unpack
from p2pedge.wire.tensors import TensorLimits as TensorLimits
from p2pedge.wire.tensors import decode_tensor as decode_tensor
from p2pedge.wire.tensors import encode_tensor as encode_tensor
