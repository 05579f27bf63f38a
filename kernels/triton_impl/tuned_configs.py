"""Per-shape launch configurations of the Triton kernels, read by kernels.triton_impl._tiles.tuned_config.

Written by ``python -m kernels.triton_impl.tune --write`` on a GPU (which times the candidates of
kernels/triton_impl/tune.py at the speedrun's shapes and keeps the fastest); commit the result so
that no later run pays autotuning time. Shapes without an entry fall back to each kernel's
heuristic (relu2_mlp.default_config, newton_schulz.gram_config / axpy_config).

MEASURED is False: the entries below are estimates for an H100/H200 (132 SMs, 227 KiB of shared
memory per block), not yet measured on a GPU.

Keys:
    relu2_gemm  "<dtype>/<epilogue>/<m|m64>/n<N>/k<K>"  (M = tokens; m64: at most 64 of them)
    ns_gram     "b<batch>/m<m>/k<k>"     X·Xᵀ of a [batch, m, k] iterate
    ns_poly     "b<batch>/m<m>"          b·A + c·A·A of [batch, m, m]
    ns_axpy     "b<batch>/m<m>/n<n>"     a·X + S·X, S [batch, m, m], X [batch, m, n]
"""

MEASURED = False
DEVICE = None
DATE = None
TRITON = None

_MLP_FWD = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, FLATTEN=True)
_MLP_BWD = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, FLATTEN=True)
_GRAM_128 = dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=4, CTAS_PER_SM=1)
_AXPY_128 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, CTAS_PER_SM=1)

TABLE = {
    "relu2_gemm": {
        "bfloat16/relu2/m/n3072/k768": dict(_MLP_FWD),
        "bfloat16/relu2_grad/m/n3072/k768": dict(_MLP_BWD),
        "bfloat16/relu2/m/n4096/k1024": dict(_MLP_FWD),
        "bfloat16/relu2_grad/m/n4096/k1024": dict(_MLP_BWD),
    },
    "ns_gram": {
        "b44/m768/k768": dict(_GRAM_128),    # 924 upper tiles: 7.00 waves
        "b24/m768/k3072": dict(_GRAM_128),   # 504 upper tiles: 3.82 waves
    },
    "ns_poly": {
        "b44/m768": dict(_GRAM_128),
        "b24/m768": dict(_GRAM_128),
    },
    "ns_axpy": {
        "b44/m768/n768": dict(_AXPY_128),    # 1584 tiles: 12.00 waves
        "b24/m768/n3072": dict(_AXPY_128),   # 3456 tiles: 26.2 waves (128x256: 13.1)
    },
}
