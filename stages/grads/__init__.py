"""Per-sample LoRA gradient features: batched exact gradients, Adam preconditioning, seeded projection."""

from stages.grads.features import build_projector, compute_features
from stages.grads.precondition import AdamPreconditioner, load_adam_state
from stages.grads.projection import Projector
from stages.grads.stage import GradsStage, grads_stages

__all__ = ["AdamPreconditioner", "GradsStage", "Projector", "build_projector", "compute_features",
           "grads_stages", "load_adam_state"]
