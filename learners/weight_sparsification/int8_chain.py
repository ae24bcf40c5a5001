"""weight-sparse+uniform: zeros in the kernels, then int8 values, as one chain (``--learner
weight-sparse+uniform``, YAML ``learner: [weight-sparse, uniform]``).

It is the weight-sparse learner's own int8 stage (``weight-sparse.bits: 8``), not the general chain
mechanism of ``learners/chain.py``, because the int8 stage must keep the zeros: the uniform learner's
QAT would train them away (its fake-quant wrappers know no masks) and its int8 TFLite file stores
them densely. weight-sparse quantizes after its training, where a zero stays a zero, sizes the
int8 file during its search (so ``--target-compression`` counts the int8 bytes), and ships a sparse
encoding. So ``--learner weight-sparse+uniform`` runs exactly ``--learner weight-sparse --bits 8``:
one code path, the options in the 'weight-sparse' section. What it adds is the chain's view in
the report: ``best.stages`` holds the sparse float model's file (the first stage alone) and the
shipped int8 file, each measured on the test split, as every chain's report does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from learners.base import Candidate, register_learner
from learners.chain import SHIPPED_FIELDS, stage_lines
from learners.weight_sparsification import artifact
from learners.weight_sparsification.learner import WeightSparseConfig, WeightSparseLearner
from pocketflow.config import parse_section
from pocketflow.errors import ConfigError
from pocketflow.export import write_atomic

FIRST, LAST = "weight-sparse", "uniform"
STAGE1_FILE = "stage1_sparse_float.tflite"


@dataclass(frozen=True)
class SparseInt8ChainConfig:
    """None of its own: the 'weight-sparse' section holds them, with bits fixed at 8."""


@register_learner
class SparseInt8Chain(WeightSparseLearner):
    name = f"{FIRST}+{LAST}"
    Config = SparseInt8ChainConfig
    sections = (FIRST,)  # a 'uniform' section's settings would be ignored, so the runner refuses them

    def __init__(self, options: WeightSparseConfig, context) -> None:
        super().__init__(options, context)
        self._sparse_epochs = 0.0

    # ------------------------------------------------------------------ options
    @classmethod
    def parse_options(cls, section: Mapping[str, Any], source: str) -> WeightSparseConfig:
        """``stages: {weight-sparse: {...}}`` (as the chains take their stages' options); no key of its own."""
        section = dict(section or {})
        stages = section.pop("stages", None) or {}
        if section:
            raise ConfigError(f"'{cls.name}.{sorted(section)[0]}' in {source}: learner '{cls.name}' has no options "
                              f"of its own; set them in the '{FIRST}' section (e.g. --set {FIRST}.int8_mode=dynamic)")
        unknown = sorted(set(stages) - {FIRST})
        if unknown:
            raise ConfigError(f"{cls.name}.stages in {source} names {', '.join(unknown)}: its options are all in "
                              f"the '{FIRST}' section (the int8 stage is weight-sparse's own)")
        options = parse_section(WeightSparseConfig, dict(stages.get(FIRST) or {}), f"{FIRST}.", source)
        return dataclasses.replace(options, bits=8)

    @classmethod
    def run_options(cls, sections: Mapping[str, Mapping[str, Any]], source: str) -> WeightSparseConfig:
        return cls.parse_options({**sections.get(cls.name, {}), "stages": {FIRST: sections.get(FIRST, {})}}, source)

    @classmethod
    def recorded_sections(cls, options: WeightSparseConfig) -> Dict[str, Dict[str, Any]]:
        return {FIRST: super().recorded_sections(options)[cls.name]}

    @classmethod
    def plan_lines(cls, options: WeightSparseConfig, finetune_epochs: float) -> List[str]:
        mode = "full-integer, calibrated" if options.int8_mode == "full" else "dynamic-range"
        return [f"stages:     {FIRST} (searched; its winner trained {finetune_epochs:g} epochs with gradual "
                f"pruning), then int8 values after training ({mode}: a zero stays a zero; its file ships)"]

    # ------------------------------------------------------------------ the winner
    def finetune(self, candidate: Candidate, epochs: float, teacher: Optional[Any] = None) -> Candidate:
        self._sparse_epochs = epochs
        return super().finetune(candidate, epochs, teacher=teacher)

    def describe(self, candidate: Candidate) -> Dict[str, Any]:
        facts = super().describe(candidate)
        facts["stages"] = self._records(facts)
        return facts

    def write_artifacts(self, candidate: Candidate, directory: Path) -> Dict[str, Any]:
        """The int8 files (weight-sparse's), then the same sparse model in float beside them
        (``stage1_sparse_float.tflite``), measured the same way: what the zeros alone kept."""
        fields = super().write_artifacts(candidate, directory)
        images, labels = self.context.dataset.test_arrays()
        path = Path(directory) / STAGE1_FILE
        write_atomic(path, artifact.sparse_tflite(candidate.model))
        first = self.context.measure_file(path, "sparse", images, labels)
        records = self._records(self.describe(candidate))
        records[0].update(shipped_format="sparse TFLite (float32)", tflite_path=first.path,
                          tflite_accuracy=first.accuracy, bytes=first.bytes, tflite_latency_ms=first.latency_ms)
        # the shipped file's fields (its tflite_* ones only where a TFLite file ships), as every chain records them
        records[1].update({key: fields[key] for key in SHIPPED_FIELDS if key in fields})
        lines = stage_lines(records)
        lines.append("The int8 stage is weight-sparse's own post-training quantization (weight-sparse.bits = 8): a "
                     "zero stays a zero, which QAT would not keep.")
        sections = fields.get("report_sections", []) + [{"title": f"Stages of {self.name}", "lines": lines}]
        return {**fields, "stages": records, "report_sections": sections}

    def _records(self, facts: Mapping[str, Any]) -> List[Dict[str, Any]]:
        first = {"learner": FIRST, "finetune_epochs": self._sparse_epochs,
                 **{key: facts[key] for key in ("sparsity", "pattern") if key in facts}}
        last = {"learner": LAST, "finetune_epochs": 0.0, "bits": 8, "int8_mode": self.options.int8_mode,
                "shipped_method": "post-training int8"}
        return [first, last]
