"""Training EAGLE-3 draft heads: `Eagle3Trainer` with training-time test, online or from offline features."""

from .eagle3_config import Eagle3TrainingArguments
from .eagle3_trainer import Eagle3DataCollator, Eagle3Trainer
from .offline_features import Eagle3FeatureDataset, prepare_features
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
