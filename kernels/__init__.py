"""Hand-written GPU kernels for fast small-LLM training, with plain-PyTorch references.

Public ops (each a ``torch.library`` op in the ``kernels`` namespace, so
``torch.compile(fullgraph=True)`` traces through them):

    newton_schulz(G, steps=5, coefficients="quintic", eps=1e-7, backend=None)
    softcap_cross_entropy(logits, targets, softcap=15.0, logit_scale=1.0, reduction="mean", ignore_index=-100)
    fp8_head_loss(x, weight, targets, softcap=15.0, logit_scale=1.0, scales=None, reduction="mean",
                  ignore_index=-100, backend=None, rounding="fp32")
    relu2_mlp(x, w_fc, w_proj, backend=None)

backend: "reference", "triton", "cuda", or None for $KERNELS_BACKEND or the
best one for the inputs' device. ``available_backends()`` lists what runs here.
"""

from kernels._checks import set_target_checks
from kernels.backend import BACKENDS, BackendUnavailable, available_backends
from kernels.fp8_head import SPEEDRUN_SCALES, fp8_head_loss
from kernels.newton_schulz import newton_schulz
from kernels.relu2_mlp import relu2_mlp
from kernels.softcap_cross_entropy import softcap_cross_entropy

__all__ = [
    "BACKENDS", "BackendUnavailable", "SPEEDRUN_SCALES", "available_backends", "fp8_head_loss", "newton_schulz",
    "relu2_mlp", "set_target_checks", "softcap_cross_entropy",
]
