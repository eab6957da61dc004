"""Message contracts shared by the service, the trainer and producers.

Imports nothing from services/ or trainer/: a producer can depend on this package alone.
"""

from schemas.classification import Classification, EntityPrediction, FieldPrediction, LabelScore, Route
from schemas.dead_letter import DeadLetter
from schemas.escalation import Escalation
from schemas.task import Entity, EntityFieldSpec, FieldSpec, FewShotExample, InputSpec, TaskSpec, default_task_path
from schemas.ticket import Ticket
from schemas.training import TrainingExample

__all__ = [
    "Classification",
    "DeadLetter",
    "Entity",
    "EntityFieldSpec",
    "EntityPrediction",
    "Escalation",
    "FieldPrediction",
    "FewShotExample",
    "FieldSpec",
    "InputSpec",
    "LabelScore",
    "Route",
    "TaskSpec",
    "Ticket",
    "TrainingExample",
    "default_task_path",
]
