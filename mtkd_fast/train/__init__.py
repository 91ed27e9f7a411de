"""Training: MTKD-RL's alternating student/agent optimisation (docs/method.md section 7), the baselines
(docs/method.md section 9),
teacher pretraining, evaluation, checkpoints and multi-process training.

- ``TrainConfig``: every option (JSON/YAML loadable); ``teacher_config(name)``: the authors' teacher settings.
- ``train(config) -> dict``: a whole run; ``train_teacher(name, **options) -> dict``: teacher pretraining.
- ``Trainer``: one run's state; ``Trainer.train_step(images, labels, indices, view)`` is one timed step.
- ``evaluate(model, loader) -> dict``: top-1/top-5 accuracy and loss.
"""

from .config import STRATEGIES, TrainConfig, teacher_config
from .run import train, train_teacher
from .strategies import aekd_weights, aver_weights, camkd_feature_weights, camkd_weights, ebkd_weights, make_strategy
from .trainer import Trainer, evaluate, feature_kl_per_sample

__all__ = ["TrainConfig", "teacher_config", "STRATEGIES", "train", "train_teacher", "Trainer", "evaluate",
           "make_strategy", "aver_weights", "ebkd_weights", "camkd_weights", "camkd_feature_weights", "aekd_weights",
           "feature_kl_per_sample"]
