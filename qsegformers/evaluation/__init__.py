"""Evaluators detectron2 does not provide as needed (see ``instance_evaluation``)."""
from .instance_evaluation import InstanceSegEvaluator

__all__ = ["InstanceSegEvaluator"]
