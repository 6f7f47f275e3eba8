"""hyphae.training: models, built-in data, the `Comm` interface, the algorithms and the loop.

Runs on the accelerators and talks to other peers only through `Comm` (comm.py); `SimNetwork`
(sim.py) implements it in memory for tests and simulations, `hyphae.node` over the network.
Never imports `hyphae.protocol`, `hyphae.node` or `hyphae.cli`.
"""

from hyphae.training._virtual_loop import VirtualTimeLoop, run_virtual
from hyphae.training.algorithms import ALGORITHMS, build_strategy
from hyphae.training.checkpoint import (
    Checkpoint,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointStore,
    Manifest,
)
from hyphae.training.comm import (
    AllReduceResult,
    BlobCorrupt,
    BlobUnavailable,
    Comm,
    CommClosed,
    CommError,
    PeerUnavailable,
    Traffic,
)
from hyphae.training.data import (
    BatchStream,
    Corpus,
    DataConfig,
    load_corpus,
    stream_key,
    validation_batches,
)
from hyphae.training.text_stream import (
    TextStream,
    is_text_source,
    open_text_data,
    text_validation_batches,
)
from hyphae.training.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from hyphae.training.acid import ACiD2, ACiD2Config
from hyphae.training.ddp import DDP, DDPConfig
from hyphae.training.diloco import DiLoCo, DiLoCoConfig
from hyphae.training.noloco import NoLoCo, NoLoCoConfig
from hyphae.training.spes import SPES, SPESConfig
from hyphae.training.upcycle import upcycle
from hyphae.training.zo import ZO, ZOConfig
from hyphae.training.loop import (
    Callback,
    EvalInfo,
    LoopConfig,
    StepInfo,
    TrainResult,
    evaluate,
    resume,
    save_checkpoint,
    train,
)
from hyphae.training.hf import export_hf, hf_config_to_model_config, load_hf_model
from hyphae.training.model import GPT, CausalLM, Llama, ModelOutput, build_model, parse_expert_name
from hyphae.training.model_config import PRESETS, ModelConfig, model_config
from hyphae.training.optim import AdamWConfig, build_adamw
from hyphae.training.sim import SimComm, SimNetwork
from hyphae.training.strategy import Metrics, Precision, Strategy, resolve_precision

__all__ = [
    "ALGORITHMS",
    "DDP",
    "GPT",
    "CausalLM",
    "Llama",
    "PRESETS",
    "AdamWConfig",
    "AllReduceResult",
    "BatchStream",
    "BlobCorrupt",
    "ByteTokenizer",
    "BlobUnavailable",
    "Callback",
    "Checkpoint",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointStore",
    "Comm",
    "CommClosed",
    "CommError",
    "Corpus",
    "DDPConfig",
    "DataConfig",
    "DiLoCo",
    "DiLoCoConfig",
    "ACiD2",
    "ACiD2Config",
    "NoLoCo",
    "NoLoCoConfig",
    "SPES",
    "SPESConfig",
    "ZO",
    "ZOConfig",
    "upcycle",
    "EvalInfo",
    "HFTokenizer",
    "LoopConfig",
    "Manifest",
    "Metrics",
    "ModelConfig",
    "ModelOutput",
    "PeerUnavailable",
    "Precision",
    "SimComm",
    "SimNetwork",
    "TextStream",
    "Tokenizer",
    "StepInfo",
    "Strategy",
    "Traffic",
    "TrainResult",
    "VirtualTimeLoop",
    "build_adamw",
    "build_model",
    "build_strategy",
    "evaluate",
    "is_text_source",
    "load_tokenizer",
    "open_text_data",
    "text_validation_batches",
    "model_config",
    "load_corpus",
    "export_hf",
    "hf_config_to_model_config",
    "load_hf_model",
    "parse_expert_name",
    "resolve_precision",
    "resume",
    "run_virtual",
    "save_checkpoint",
    "stream_key",
    "train",
    "validation_batches",
]
