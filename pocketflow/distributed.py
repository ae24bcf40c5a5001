"""The one module that knows about Horovod.

``make_context()`` returns a small object (rank, size, barrier, broadcast, gradient-tape
wrapping, metric averaging) that training and the search use. The single-process
implementation is the default; the Horovod one is chosen when the process was started by
``horovodrun``/``mpirun`` (their environment variables are present). Learners receive the
context and never import Horovod themselves.
"""

from __future__ import annotations

import os
from typing import Any, List

import tensorflow as tf

from pocketflow.errors import UserError

# Variables that horovodrun (gloo or MPI) or mpirun set in each worker.
_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


class SingleProcess:
    """One process, no communication: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0
    is_chief = True
    name = "single-process"

    def barrier(self) -> None:
        return None

    def broadcast_object(self, value: Any, root_rank: int = 0) -> Any:
        return value

    def broadcast_variables(self, variables: List[tf.Variable]) -> None:
        return None

    def wrap_tape(self, tape: tf.GradientTape) -> tf.GradientTape:
        return tape

    def average(self, value: float) -> float:
        return value

    def shard(self) -> tuple:
        return (self.rank, self.size)


class HorovodContext(SingleProcess):
    """Horovod over Gloo or MPI: data sharded by rank, gradients averaged, rank 0 writes."""

    name = "horovod"

    def __init__(self) -> None:
        try:
            import horovod.tensorflow as hvd
        except ImportError as error:
            raise UserError(
                "this process was started by horovodrun/mpirun but Horovod is not importable "
                f"({error}); install it with scripts/install.sh (it builds horovod==0.28.1 with Gloo)"
            ) from None
        hvd.init()
        self._hvd = hvd
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.local_rank = hvd.local_rank()
        self.is_chief = self.rank == 0

    def barrier(self) -> None:
        self._hvd.allreduce(tf.constant(0.0), name="pocketflow_barrier")

    def broadcast_object(self, value: Any, root_rank: int = 0) -> Any:
        return self._hvd.broadcast_object(value, root_rank=root_rank)

    def broadcast_variables(self, variables: List[tf.Variable]) -> None:
        self._hvd.broadcast_variables(variables, root_rank=0)

    def wrap_tape(self, tape: tf.GradientTape) -> tf.GradientTape:
        return self._hvd.DistributedGradientTape(tape)

    def average(self, value: float) -> float:
        return float(self._hvd.allreduce(tf.constant(value, tf.float64), op=self._hvd.Average).numpy())


def launched_by_horovod() -> bool:
    return any(variable in os.environ for variable in _LAUNCHER_VARIABLES)


def make_context() -> SingleProcess:
    """Horovod when started by horovodrun/mpirun, otherwise a single process."""
    return HorovodContext() if launched_by_horovod() else SingleProcess()
