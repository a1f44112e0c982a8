"""Training EAGLE-3 draft heads: `Eagle3Trainer` with training-time test, online or from stored features."""

from .eagle3_trainer import Eagle3DataCollator, Eagle3Trainer
from .stored_features import Eagle3FeatureDataset, prepare_features
from .training_args import Eagle3TrainingArguments
from .ttt import TargetDistribution, TTTOutput, target_distribution_from_logits, training_time_test

__all__ = [
    "Eagle3DataCollator",
    "Eagle3FeatureDataset",
    "Eagle3Trainer",
    "Eagle3TrainingArguments",
    "TTTOutput",
    "TargetDistribution",
    "prepare_features",
    "target_distribution_from_logits",
    "training_time_test",
]
