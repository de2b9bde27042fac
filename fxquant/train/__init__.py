"""fxquant.train: the training side — the step, the epoch loop's parts, optimizer groups and schedule, SAM,
teachers, augmentation, the auxiliary losses, coreset selection and data parallelism.

Ownership: training builds what training needs. :class:`TrainStep` builds the recipe's losses and their
teachers from the float model (``qmodel.float_model`` or one it is given); ``fxquant.fit`` composes a whole run.

Example usage::

    optimizer = fxquant.train.make_optimizer(qmodel, qmodel.recipe.train)
    step = fxquant.TrainStep(qmodel, optimizer)
"""

from . import coreset, devices, distributed, losses
from .augment import augment_batch, augment_image
from .devices import Precision, model_device, resolve_device, to_device
from .loop import EpochRecord, TrainingDiverged, evaluate, make_loader, progress_bar, run_epoch
from .optim import lr_at, make_optimizer, parameter_groups
from .sam import SAM
from .step import TrainStep, build_teacher, unwrap
from .teachers import copy_for_teacher, float_teacher, freeze

__all__ = [
    "SAM",
    "EpochRecord",
    "Precision",
    "TrainStep",
    "TrainingDiverged",
    "augment_batch",
    "augment_image",
    "build_teacher",
    "copy_for_teacher",
    "coreset",
    "devices",
    "distributed",
    "evaluate",
    "float_teacher",
    "freeze",
    "losses",
    "lr_at",
    "make_loader",
    "make_optimizer",
    "model_device",
    "parameter_groups",
    "progress_bar",
    "resolve_device",
    "run_epoch",
    "to_device",
    "unwrap",
]
