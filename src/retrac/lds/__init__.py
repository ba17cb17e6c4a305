"""``retrac lds``: how good attributions are, measured by the linear datamodeling score.

Draw ``M`` random subsets of the training set (:class:`LDSRun`), retrain one model per subset with a
training function ``train(subset_indices, out_dir)`` (:class:`DemoTrainer`, :class:`CommandTrainer`
or any callable), measure each test sample's loss on each model at fixed events, and correlate the
losses with the effect each scoring predicts (:func:`lds_table`); :func:`counterfactual_check`
removes each test sample's top proponents and retrains.
"""

from retrac.lds.counterfactual import CounterfactualResult, counterfactual_check
from retrac.lds.metrics import (
    LDSScore,
    attributor_scores,
    format_table,
    index_scores,
    lds_score,
    lds_table,
    linear_datamodeling_scores,
    pixel_scores,
    random_scores,
)
from retrac.lds.run import LDSConfig, LDSRun, draw_subsets
from retrac.lds.trainers import CommandTrainer, DemoTrainer, TrainFunction, find_model_checkpoint

__all__ = [
    "CommandTrainer",
    "CounterfactualResult",
    "DemoTrainer",
    "LDSConfig",
    "LDSRun",
    "LDSScore",
    "TrainFunction",
    "attributor_scores",
    "counterfactual_check",
    "draw_subsets",
    "find_model_checkpoint",
    "format_table",
    "index_scores",
    "lds_score",
    "lds_table",
    "linear_datamodeling_scores",
    "pixel_scores",
    "random_scores",
]
