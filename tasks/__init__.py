"""Tasks, registered by name: one import line each is the registration."""

from tasks import cifar_resnet, mnist_mlp, vit_pruning  # noqa: F401
from tasks.base import Task, TaskData

__all__ = ["Task", "TaskData"]
