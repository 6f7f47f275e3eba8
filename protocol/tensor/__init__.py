"""The tensor plane: bulk tensors between members, fast, authenticated and encrypted.

Anything big (weights, pseudo-gradients, experts, checkpoints) travels here instead of over
libp2p streams (CPU-bound near 120 MB/s). Keys are agreed over ``/hyphae/tensor/1`` on the
authenticated libp2p connection; frames then move over a direct TCP connection (AES-256-GCM,
counter nonces, 1 MiB frames, no extra copies of tensor memory), or, when no direct path
exists, over the libp2p stream itself. Layout (STYLE.md §3):

* :mod:`.spec` / :mod:`.codecs`: tensors as spec + bytes; raw, fp16, bf16, int8, int4 codecs.
* :mod:`.wire` / :mod:`.keys`: frame, header and handshake formats; key agreement, sealing.
* :mod:`.carrier` / :mod:`.session` / :mod:`.connect`: one data connection and how it is made.
* :mod:`.service`: :class:`TensorPlane` (send/recv/exchange/request, stats).
* :mod:`.allreduce`: fault-tolerant group all-reduce. :mod:`.blobs`: content-addressed blobs.
* :mod:`.budget`: byte limits sized from the model a run trains.
"""

from .allreduce import AllReduceResult
from .blobs import BlobConfig, BlobService, open_blob_service
from .budget import TransferBudget, budget_for_state
from .codecs import CODEC_NAMES, Codec
from .config import TensorConfig
from .connect import Puncher
from .errors import BlobCorrupt, BlobNotFound, BlobTooLarge, IntegrityError, NotSent, Refused, RemoteError
from .service import Message, Reply, TensorPlane, open_tensor_plane
from .spec import Tensor, TensorSpec
from .wire import PROTOCOL_ID

__all__ = [
    "AllReduceResult", "BlobConfig", "BlobCorrupt", "BlobNotFound", "BlobService", "BlobTooLarge", "open_blob_service",
    "CODEC_NAMES", "Codec", "IntegrityError", "Message", "NotSent", "PROTOCOL_ID", "Puncher", "Refused", "RemoteError",
    "Reply", "Tensor", "TensorConfig", "TensorPlane", "TensorSpec", "TransferBudget", "budget_for_state",
    "open_tensor_plane",
]
