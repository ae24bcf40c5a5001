"""Target constraints: which measured quantity each target names, and how far a candidate misses it.

A violation <= 0 means the candidate meets that target. Candidates that miss any target are
recorded, but never win.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping


@dataclass(frozen=True)
class TargetKind:
    name: str
    higher_is_better: bool  # speedup/compression/sparsity: at least the target; bits: at most
    description: str

    def violation(self, achieved: float, target: float) -> float:
        """Relative shortfall: 0.1 means 10% short of the target; <= 0 means met."""
        if self.higher_is_better:
            return (target - achieved) / target
        return (achieved - target) / target


TARGET_KINDS: Dict[str, TargetKind] = {
    "speedup": TargetKind("speedup", True, "baseline MACs / compressed MACs"),
    "compression": TargetKind("compression", True, "float TFLite bytes of the baseline / shipped bytes"),
    "latency_speedup": TargetKind("latency_speedup", True,
                                  "TFLite latency of the baseline's file / the shipped file's, timed in turn"),
    "latency_ms": TargetKind("latency_ms", False, "the shipped TFLite file's latency in ms, timed at the end"),
    "sparsity": TargetKind("sparsity", True, "fraction of prunable weights that are zero"),
    "bits": TargetKind("bits", False, "parameter-weighted average weight bits"),
}

TOLERANCE = 1e-9


def violations(requested: Mapping[str, float], achieved: Mapping[str, float]) -> List[float]:
    """One value per requested target (<= 0: met). A target the candidate did not measure is missed."""
    out = []
    for name, target in requested.items():
        value = achieved.get(name)
        out.append(1.0 if value is None else TARGET_KINDS[name].violation(value, target))
    return out


def meets(requested: Mapping[str, float], achieved: Mapping[str, float]) -> bool:
    return all(v <= TOLERANCE for v in violations(requested, achieved))


def describe_shortfall(requested: Mapping[str, float], best_reached: Mapping[str, float]) -> str:
    parts = []
    for name, target in requested.items():
        reached = best_reached.get(name)
        shown = "nothing" if reached is None else f"{reached:.3g}"
        parts.append(f"{name} {target:g} requested, best reached {shown}")
    return "; ".join(parts)


