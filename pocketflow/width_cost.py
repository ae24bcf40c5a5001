"""What a convolution's output width costs in the runtime we ship for: measured here, not assumed.

XNNPACK computes output channels in register tiles, so TFLite latency is a step function of a
layer's width, not a line: on a CPU with AVX512 a 3x3 convolution with 24 output channels took
longer than one with 32, and 40 or 48 as long as 64 (``python scripts/time_widths.py``). MACs
miss that, so a latency target needs the runtime's own curve. The curve is measured once per
machine and runtime (about 20 s) on a probe: eight 3x3 convolutions side by side on a 16x16x32
input, summed, each width timed in turn with the others (``compare_latency``), and cached.

``WidthCost(width)`` is the *effective width*: what ``width`` output channels cost, in channels
of the widest probe. A layer's predicted time is its MACs times ``effective(out) / out``; time
is taken as linear in the input channels, so only the
output side needs the curve; ``tests/pocketflow/test_width_cost.py`` checks the whole prediction
against files timed on the machine that runs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

PROBE_SIZE = 16  # the probe's input: PROBE_SIZE x PROBE_SIZE x PROBE_INPUTS
PROBE_INPUTS = 32
PROBE_BRANCHES = 8  # convolutions side by side, so per-invocation overhead is small against them
PROBE_WIDTHS = tuple(range(4, 65, 4))  # the curve repeats past its widest tile (extended by period)
RUN_FILE = "width_cost.json"  # the curve a run planned with, in its directory


@dataclass(frozen=True)
class WidthCost:
    """Effective output widths measured at ``widths`` (ascending), from ``milliseconds``."""

    widths: Tuple[int, ...]
    milliseconds: Tuple[float, ...]
    runtime: str = ""

    def __call__(self, width: int) -> float:
        """The cost of ``width`` output channels, in channels of the widest probe (a width between
        two probes costs what the next one up costs; past the widest, whole periods add up)."""
        if width <= 0:
            return 0.0
        period = self.widths[-1]
        periods, rest = divmod(int(width), period)
        cost = periods * float(period)
        if rest:
            step = next(index for index, probed in enumerate(self.widths) if probed >= rest)
            cost += self.milliseconds[step] / self.milliseconds[-1] * period
        return cost

    def as_dict(self) -> dict:
        return {"widths": list(self.widths), "milliseconds": list(self.milliseconds), "runtime": self.runtime}


def linear() -> WidthCost:
    """Every channel costs the same: the MAC count's model, for tests and machines without a runtime."""
    widths = tuple(range(1, PROBE_WIDTHS[-1] + 1))
    return WidthCost(widths, tuple(float(width) for width in widths), "linear (MACs)")


def _probe(width: int):
    import tensorflow as tf

    inputs = tf.keras.Input((PROBE_SIZE, PROBE_SIZE, PROBE_INPUTS))
    branches = [tf.keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
                for _ in range(PROBE_BRANCHES)]
    return tf.keras.Model(inputs, tf.keras.layers.Add()(branches))


def measure(widths: Sequence[int] = PROBE_WIDTHS, rounds: int = 3, min_seconds: float = 0.2, threads: int = 1,
            progress: Optional[Callable[[str], None]] = None, mode: str = "float") -> WidthCost:
    """Time the probe at every width in the shipping runtime (batch 1, ``threads`` threads), as a
    ``mode`` file (float; or int8, quantized on random inputs, for a look at the integer kernels)."""
    import numpy as np

    from pocketflow.export import compare_latency, convert, runtime_name, write_atomic

    representative = np.random.default_rng(0).random((16, PROBE_SIZE, PROBE_SIZE, PROBE_INPUTS)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="pocketflow-widths-") as directory:
        paths = []
        for width in widths:
            path = Path(directory) / f"width{width}.tflite"
            write_atomic(path, convert(_probe(width), mode, representative if mode != "float" else None))
            paths.append(path)
        if progress:
            progress(f"timing {len(paths)} probe widths ({rounds} rounds)")
        timings = compare_latency(paths, rounds=rounds, min_seconds=min_seconds, threads=threads)
    milliseconds = tuple(timings[str(path)] for path in paths)
    return WidthCost(tuple(int(width) for width in widths), milliseconds, runtime_name())


def machine_key(threads: int = 1) -> str:
    """The runtime, CPU model, CPU flags and threads: what the curve depends on."""
    from pocketflow.export import runtime_name
    from pocketflow.precision import cpu_flags

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    identity = json.dumps([runtime_name(), model, sorted(cpu_flags()), threads, PROBE_WIDTHS, PROBE_SIZE, PROBE_INPUTS])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def cached(cache_directory: Path, threads: int = 1, progress: Optional[Callable[[str], None]] = None) -> WidthCost:
    """This machine's curve, measured on first use and read from ``cache_directory`` after."""
    path = Path(cache_directory) / "width_cost" / f"{machine_key(threads)}.json"
    stored = load(path)
    if stored is not None:
        return stored
    log.info("measuring what each output width costs in the TFLite runtime on this machine (once; cached in %s)",
             path.parent)
    cost = measure(threads=threads, progress=progress)
    save(cost, path)
    return cost


def for_run(run_directory: Optional[Path], cache_directory: Path, threads: int = 1) -> WidthCost:
    """The curve a run plans with: the one its directory recorded (so ``--resume`` projects every
    trial as before, whatever the cache holds now), else this machine's, recorded there."""
    recorded = Path(run_directory) / RUN_FILE if run_directory else None
    if recorded is not None:
        stored = load(recorded)
        if stored is not None:
            return stored
    cost = cached(cache_directory, threads=threads)
    if recorded is not None:
        save(cost, recorded)
    return cost


def load(path: Path) -> Optional[WidthCost]:
    """A stored curve, or None where the file is missing or damaged (then it is measured again)."""
    try:
        stored = json.loads(Path(path).read_text())
        return WidthCost(tuple(stored["widths"]), tuple(stored["milliseconds"]), stored.get("runtime", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(cost: WidthCost, path: Path) -> None:
    from pocketflow.export import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), json.dumps(cost.as_dict()).encode())
