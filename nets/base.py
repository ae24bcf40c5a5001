"""What a built-in net is (NetSpec, its default Schedule) and the registry builders add themselves to."""

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
