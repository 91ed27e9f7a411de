"""mtkd_fast: fast multi-teacher knowledge distillation (MTKD-RL, Yang et al., AAAI 2025).

- ``mtkd_fast.reference``: pure-PyTorch reference of the method's maths (the ground truth).
- ``mtkd_fast.MTKDLoss``: the drop-in multi-teacher distillation loss (with the agent's per-sample statistics).
- ``mtkd_fast.Distiller``: MTKD-RL (agent included) or a baseline weighting as one module for any training loop.
- ``mtkd_fast.agent``: the MTKD-RL agent (``MTKDAgent``, ``AgentState``) and its replay buffer.
- ``mtkd_fast.train``: the trainer (``TrainConfig``, ``train``, ``train_teacher``, ``evaluate``, ``Trainer``).
- ``mtkd_fast.build_info()``: what the compiled extension contains.
"""

from . import _ext, reference
from ._ext import ExtensionMissingWarning, build_info
from .distiller import Distiller, DistillerOutput
from .loss import MTKDLoss, MTKDLossOutput

__version__ = "0.1.0"
__all__ = ["reference", "build_info", "ExtensionMissingWarning", "MTKDLoss", "MTKDLossOutput", "Distiller",
           "DistillerOutput", "__version__"]

_ext.warn_if_missing()
