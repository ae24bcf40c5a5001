"""Built-in nets: name -> NetSpec (builder, default dataset, default training schedule).

A builder takes the dataset's input shape and class count, so one net works on any dataset
whose images it can take (``mobilenet_v1`` on 32x32 CIFAR or 224x224 ImageNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

from pocketflow.registry import Registry


@dataclass(frozen=True)
class Schedule:
    """A net's default training recipe; TrainConfig values override it field by field."""

    epochs: float
    batch_size: int
    learning_rate: float
    schedule: str = "cosine"  # cosine | step | constant
    optimizer: str = "sgd"  # sgd (momentum 0.9, nesterov) | adam
    weight_decay: float = 5e-4
    augment: bool = False


@dataclass(frozen=True)
class NetSpec:
    name: str
    build: Callable[..., Any]  # build(input_shape, num_classes, **options) -> keras.Model
    default_dataset: str
    schedule: Schedule
    options: Dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def make(self, input_shape: Tuple[int, ...], num_classes: int) -> Any:
        return self.build(tuple(input_shape), num_classes, **self.options)


NETS: Registry[NetSpec] = Registry("net", flag="--net")


def register_net(spec: NetSpec) -> NetSpec:
    NETS.add(spec.name, spec)
    return spec


# Builders register on import.
from nets import digits_cnn, lenet, mobilenet, resnet_cifar  # noqa: E402,F401

__all__ = ["NETS", "NetSpec", "Schedule", "register_net"]
