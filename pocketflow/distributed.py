"""The one module that knows about Horovod.

``make_context()`` returns a small object (rank, size, barrier, broadcast, gradient-tape
wrapping, metric averaging) that training and the search use. The single-process
implementation is the default; the Horovod one is chosen when the process was started by
``horovodrun``/``mpirun`` (their environment variables are present), with no extra flag.
Learners receive the context and never import Horovod themselves.

Under Horovod: one GPU per local rank (or, without GPUs, a share of the CPU cores per
local rank), gradients averaged by ``DistributedGradientTape``, rank 0's variables
broadcast after the first step, training data sharded by rank, the learning rate scaled by
the world size (``train.scale_learning_rate``), metrics and BatchNorm statistics averaged,
and only rank 0 logs progress and writes files.
"""

from __future__ import annotations

import logging
import os
from typing import Any, List

import tensorflow as tf

from pocketflow.errors import UserError

log = logging.getLogger(__name__)

# Variables that horovodrun (gloo or MPI) or mpirun/srun set in each worker.
_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")

INSTALL_HINT = ("install it with scripts/install.sh (it builds horovod==0.28.1 against TensorFlow with Gloo), "
                "or run without horovodrun/mpirun for a single process")


class SingleProcess:
    """One process, no communication: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    is_chief = True
    name = "single-process"

    def barrier(self) -> None:
        return None

    def broadcast_object(self, value: Any, root_rank: int = 0) -> Any:
        """``value`` as rank ``root_rank`` holds it (any picklable object, None included)."""
        return value

    def broadcast_variables(self, variables: List[tf.Variable]) -> None:
        """Give every rank rank 0's values of ``variables`` (same list, same order, on every rank)."""
        return None

    def average_variables(self, variables: List[tf.Variable]) -> None:
        """Replace floating-point ``variables`` by their mean over the ranks (others: rank 0's value).

        Used at the end of training for state that each rank updates from its own shard
        (BatchNorm moving statistics), so every rank ends with identical weights."""
        return None

    def wrap_tape(self, tape: tf.GradientTape) -> tf.GradientTape:
        return tape

    def average(self, value: float) -> float:
        return value

    def shard(self) -> tuple:
        return (self.rank, self.size)

    def describe(self) -> str:
        return self.name


class HorovodContext(SingleProcess):
    """Horovod over Gloo or MPI: data sharded by rank, gradients averaged, rank 0 writes."""

    name = "horovod"

    def __init__(self) -> None:
        try:
            import horovod.tensorflow as hvd
        except Exception as error:  # noqa: BLE001 - ImportError, or a Horovod built against another TF
            raise UserError(f"this process was started by horovodrun/mpirun but Horovod is not importable "
                            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                            f"{INSTALL_HINT}") from None
        try:
            hvd.init()
        except Exception as error:  # noqa: BLE001 - e.g. mpirun with a Horovod built without MPI
            raise UserError(f"Horovod could not start ({type(error).__name__}: {error}); start the job with "
                            f"'horovodrun --gloo' (scripts/launch_horovod.sh), or rebuild Horovod with "
                            f"HOROVOD_WITH_MPI=1 to use mpirun") from None
        self._hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.local_rank = hvd.local_rank()
        self.local_size = hvd.local_size()
        self.is_chief = self.rank == 0
        self._place()
        if not self.is_chief:
            # One voice: rank 0 logs progress; the other ranks only report problems.
            logging.getLogger().setLevel(logging.WARNING)
        log.info("Horovod: %s", self.describe())

    def _place(self) -> None:
        """One GPU per local rank; without GPUs, split the CPU cores between the local ranks."""
        gpus = tf.config.list_physical_devices("GPU")
        try:
            if gpus:
                for gpu in gpus:
                    tf.config.experimental.set_memory_growth(gpu, True)
                tf.config.set_visible_devices(gpus[self.local_rank % len(gpus)], "GPU")
            elif self.local_size > 1 and "TF_NUM_INTRAOP_THREADS" not in os.environ:
                threads = max(1, (os.cpu_count() or 1) // self.local_size)
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError as error:  # TensorFlow was already initialised: keep its placement
            log.warning("Horovod: device placement left as it is (%s)", error)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} (local rank {self.local_rank} of {self.local_size})"

    def barrier(self) -> None:
        self._hvd.allreduce(tf.constant(0.0), name="pocketflow_barrier")

    def broadcast_object(self, value: Any, root_rank: int = 0) -> Any:
        # A fixed name: Horovod's default is the value's type name, which differs between the
        # root (a dict) and the receivers (None).
        return self._hvd.broadcast_object(value, root_rank=root_rank, name="pocketflow_object")

    def broadcast_variables(self, variables: List[tf.Variable]) -> None:
        self._hvd.broadcast_variables(variables, root_rank=0)

    def average_variables(self, variables: List[tf.Variable]) -> None:
        floating = [v for v in variables if v.dtype.is_floating]
        others = [v for v in variables if not v.dtype.is_floating]
        if floating:
            averaged = self._hvd.grouped_allreduce([v.read_value() for v in floating], op=self._hvd.Average)
            for variable, value in zip(floating, averaged):
                variable.assign(value)
        if others:
            self.broadcast_variables(others)

    def wrap_tape(self, tape: tf.GradientTape) -> tf.GradientTape:
        return self._hvd.DistributedGradientTape(tape)

    def average(self, value: float) -> float:
        return float(self._hvd.allreduce(tf.constant(value, tf.float64), op=self._hvd.Average).numpy())


def launched_by_horovod() -> bool:
    return any(variable in os.environ for variable in _LAUNCHER_VARIABLES)


def make_context() -> SingleProcess:
    """Horovod when started by horovodrun/mpirun, otherwise a single process."""
    return HorovodContext() if launched_by_horovod() else SingleProcess()
