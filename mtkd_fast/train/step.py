"""The step chain's old home: :mod:`mtkd_fast.step` holds it now (it has to import without the trainer, since
``MTKDLoss`` and ``Distiller`` run it too); these names stay importable from here."""

from ..step import DistillStep, distill_step, feature_kl_per_sample, resolve_backend, teacher_ce

__all__ = ["DistillStep", "distill_step", "feature_kl_per_sample", "teacher_ce", "resolve_backend"]
