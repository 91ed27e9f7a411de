"""Teacher-output cache: the frozen teachers' logits, pooled embeddings and feature maps for every training
sample under each of V replayable augmentation views, computed once and memory-mapped at training time.

- ``build_cache(path, dataset, teachers, views=V, ...)`` (CLI: ``mtkd-fast cache build``) writes it.
- ``open_teacher_source(path, teachers=None, device="cpu")`` opens it as a TeacherSource for the trainer.
- ``view_for_epoch(source_or_manifest, epoch)`` is the view an epoch replays.
- ``verify_cache(path)`` (CLI: ``mtkd-fast cache verify``) checks every chunk's checksum.
"""

from .build import build_cache, plan_cache
from .manifest import CacheCorruptError, CacheMismatchError, read_manifest
from .source import CachedTeachers, open_teacher_source, verify_cache, view_for_epoch
from .storage import per_sample_bytes

__all__ = ["build_cache", "plan_cache", "open_teacher_source", "CachedTeachers", "view_for_epoch", "verify_cache",
           "read_manifest", "CacheMismatchError", "CacheCorruptError", "per_sample_bytes"]
