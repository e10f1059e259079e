"""Built-in selectors; importing this package registers them with `SELECTORS`."""

from . import cluster, delta_loss, less, loss_buckets, near, nice, random_rows, tsds
from .cluster import ClusterSelector
from .delta_loss import DeltaLossSelector
from .less import LessSelector, less_scores
from .loss_buckets import LossSelector
from .near import NearSelector
from .random_rows import RandomSelector
from .tsds import TsdsSelector, tsds_probabilities

__all__ = [
    "nice",
    "cluster", "delta_loss", "less", "loss_buckets", "near", "random_rows", "tsds",
    "ClusterSelector", "DeltaLossSelector", "LessSelector", "LossSelector", "NearSelector",
    "RandomSelector", "TsdsSelector", "less_scores", "tsds_probabilities",
]
