"""``hyphae export --hf OUT``: write a checkpoint as a Hugging Face model directory.

    hyphae export --hf OUT [--data-dir DIR | --checkpoint DIR] [--tokenizer tokenizer.json]

The newest checkpoint of the data dir's ``checkpoints/`` is exported unless ``--checkpoint``
names another (a ``step-*`` directory, or a directory of them). The result loads with
``transformers.AutoModelForCausalLM.from_pretrained(OUT)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hyphae.node.config import default_data_dir, load_config

__all__ = ["add_export_parser", "export_command"]


def add_export_parser(top: argparse._SubParsersAction) -> None:
    """Add ``export`` to the top-level subparsers."""
    p = top.add_parser("export", help="write a checkpoint as a Hugging Face model directory",
                       description="Export the newest checkpoint (Llama models as llama/qwen2, GPTs as gpt2; not MoE) "
                                   "as config.json + model.safetensors, loadable by transformers.")
    p.add_argument("--hf", required=True, type=Path, metavar="OUT", help="directory to write (created if missing)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"node data directory whose checkpoints/ is read (default: $HYPHAE_DATA_DIR or {default_data_dir()})")
    p.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="export this checkpoint (a step-* directory, or a directory of them) instead")
    p.add_argument("--tokenizer", type=Path, metavar="FILE", help="tokenizer.json to copy into OUT")


def export_command(args: argparse.Namespace) -> int:
    """Run ``hyphae export``; errors are HyphaeErrors, which main() prints."""
    data_dir = None
    if args.checkpoint is None:
        data_dir = args.data_dir or load_config(flags={}).data_dir
    from hyphae.node.export import export_checkpoint_hf  # torch + safetensors: only when exporting

    result = export_checkpoint_hf(args.hf, data_dir=data_dir, checkpoint=args.checkpoint, tokenizer_file=args.tokenizer)
    print(f"exported step {result.step} ({result.parameters / 1e6:.1f}M parameters) from {result.checkpoint}\n"
          f"to {result.path}; load it with transformers.AutoModelForCausalLM.from_pretrained({str(result.path)!r})")
    return 0
