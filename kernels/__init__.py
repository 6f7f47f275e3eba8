"""hyphae.kernels: the hot loops, the same bits on CPU and GPU.

Each op has a torch reference (`*_ref`, the CPU path and the oracle) and a Triton kernel for
CUDA tensors; the public function picks the path per tensor (CUDA + Triton installed -> Triton,
anything else -> reference). Triton is optional (`pip install 'hyphae[gpu]'`) and is imported
only when a CUDA tensor first needs it.

* `perturb`: z(seed, i) = +-1 from Philox-4x32-10, and the 64-bit seed derivation.
* `zo`: in-place theta += c * z(seed) over a parameter list, batched over (seed, c) pairs.
* `quant`: blockwise absmax int8 / 4-bit quantization with error feedback.
* `outer`: fused NoLoCo and DiLoCo (Nesterov SGD) outer steps.
* `sparse`: chunked top-k + int8 / 2-bit values with error feedback (SparseLoCo's compressor).
"""

from hyphae.kernels._triton import triton_available
from hyphae.kernels.outer import diloco_outer_, diloco_outer_ref_, noloco_outer_, noloco_outer_ref_
from hyphae.kernels.perturb import derive_seed, rademacher, rademacher_like, rademacher_ref
from hyphae.kernels.quant import (
    DEFAULT_BLOCK_SIZE,
    Quantized,
    dequantize,
    dequantize_ref,
    quantize,
    quantize_ef_,
    quantize_ef_ref_,
    quantize_ref,
)
from hyphae.kernels.sparse import Sparse, SparseLayout, sparse_topk_ef_, sparse_topk_ef_ref_, sparse_values
from hyphae.kernels.zo import zo_apply_, zo_apply_ref_, zo_perturb_, zo_unperturb_

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "Quantized",
    "dequantize",
    "dequantize_ref",
    "derive_seed",
    "diloco_outer_",
    "diloco_outer_ref_",
    "noloco_outer_",
    "noloco_outer_ref_",
    "quantize",
    "quantize_ef_",
    "quantize_ef_ref_",
    "quantize_ref",
    "rademacher",
    "rademacher_like",
    "rademacher_ref",
    "Sparse",
    "SparseLayout",
    "sparse_topk_ef_",
    "sparse_topk_ef_ref_",
    "sparse_values",
    "triton_available",
    "zo_apply_",
    "zo_apply_ref_",
    "zo_perturb_",
    "zo_unperturb_",
]
