"""Named benchmark scenarios: which model, which method, which target, what budget.

A scenario is either one of our runs (``main.py`` arguments) or a peer method (see
``peers.py``) given the same arguments, so both sides of a comparison share the model, the data,
the target and the training budget. ``quick`` scenarios use only built-in data (scikit-learn's
digits) and fit in a few minutes on 2 cores; the others need ``../shared/data``.

Published figures are kept in their own field, with where they come from; they are never mixed
with what we measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from pocketflow.registry import Registry

def subject_args(subject: str, shared: str) -> Tuple[str, ...]:
    """main.py arguments that select the model and data of a subject (``shared``: ../shared/data). The
    shared ResNets come from their recipe files in configs/ (model, data, normalization), with the model
    and data paths pointed at ``shared``; commands run from the repository root."""
    table = {
        "digits_cnn": (),
        "resnet20": ("--config", "configs/resnet20_cifar10.yaml", "--model", f"{shared}/pretrained/resnet20_cifar10.h5",
                     "--data-dir", f"{shared}/cifar10"),
        "resnet56": ("--config", "configs/resnet56_cifar10.yaml", "--model", f"{shared}/pretrained/resnet56_cifar10.h5",
                     "--data-dir", f"{shared}/cifar10"),
        "lenet-mnist": ("--net", "lenet", "--dataset", "mnist", "--data-dir", f"{shared}/mnist"),
        "lenet-fashion": ("--net", "lenet", "--dataset", "fashion-mnist", "--data-dir", f"{shared}/fashion-mnist"),
    }
    return table[subject]


@dataclass(frozen=True)
class Published:
    """A figure somebody else published for a comparable setting (never measured here)."""

    figure: str
    source: str


@dataclass(frozen=True)
class Scenario:
    name: str
    subject: str  # a key of subject_args
    method: str  # a learner name (ours) or a peer name (see peers.PEERS)
    target: Tuple[str, ...]  # main.py target flags, e.g. ("--target-speedup", "2.0")
    args: Tuple[str, ...] = ()  # further main.py flags (budget, learner options)
    peer: bool = False
    quick: bool = False
    minutes: float = 5.0  # expected wall time on 2 cores, for planning
    published: Optional[Published] = None
    # Run once per (flag value) and report the spread: e.g. ("--seed", ("0", "1", "2")).
    repeat: Optional[Tuple[str, Tuple[str, ...]]] = None

    def needs_shared(self) -> bool:
        return self.subject != "digits_cnn"

    def arguments(self, shared: str) -> List[str]:
        """main.py arguments; ``{shared}`` in ``args`` (e.g. another shared model as teacher) becomes ``shared``."""
        return [*subject_args(self.subject, shared), *self.target, *(a.replace("{shared}", shared) for a in self.args)]

    def target_text(self) -> str:
        return " ".join(self.target).replace("--target-", "")


SCENARIOS: Registry[Scenario] = Registry("scenario", flag="--scenario")
ORDER: List[str] = []  # the order scenarios were added in (tables follow it)


def add(*scenarios: Scenario) -> None:
    for scenario in scenarios:
        SCENARIOS.add(scenario.name, scenario)
        ORDER.append(scenario.name)


SEEDS = ("--seed", ("0", "1", "2"))

# ----------------------------------------------------------------------------- built-in digits (quick)
add(
    Scenario("digits-channel-2.5x", "digits_cnn", "channel", ("--target-speedup", "2.5"), quick=True, minutes=1),
    Scenario("digits-sparse-0.8", "digits_cnn", "weight-sparse", ("--target-sparsity", "0.8"), quick=True,
             minutes=2),
    Scenario("digits-uniform-int8", "digits_cnn", "uniform", ("--target-bits", "8"), quick=True, minutes=1),
    Scenario("digits-tfmot-prune-0.8", "digits_cnn", "tfmot-prune", ("--target-sparsity", "0.8"),
             ("--finetune-epochs", "6"), peer=True, quick=True, minutes=1),
    Scenario("digits-tflite-ptq-int8", "digits_cnn", "tflite-ptq", (), peer=True, quick=True, minutes=0.5),
    # Sampler comparison at an equal trial budget, three seeds each (the spread, not one run). TPE's
    # first 5 trials are random draws with the same seeds as the random sampler's, so the budget must
    # leave it room to differ: 24 trials (about a second each here) = 1 reference + 5 random + 18 guided.
    Scenario("digits-channel-6x-tpe", "digits_cnn", "channel", ("--target-speedup", "6.0"),
             ("--trials", "24", "--sampler", "tpe"), quick=True, minutes=2.5, repeat=SEEDS),
    Scenario("digits-channel-6x-random", "digits_cnn", "channel", ("--target-speedup", "6.0"),
             ("--trials", "24", "--sampler", "random"), quick=True, minutes=2.5, repeat=SEEDS),
)

# ----------------------------------------------------------------------------- built-in digits, the size learners
add(
    Scenario("digits-lowbit-4bit", "digits_cnn", "uniform", ("--target-bits", "4"), minutes=3),
    Scenario("digits-nonuniform-4bit", "digits_cnn", "non-uniform", ("--target-bits", "4"), minutes=4),
    Scenario("digits-product-quant-15x", "digits_cnn", "product-quant", ("--target-compression", "15"), minutes=3),
)

# ----------------------------------------------------------------------------- LeNet on MNIST / Fashion-MNIST
for subject in ("lenet-mnist", "lenet-fashion"):
    add(
        # LeNet's convolutions have 6 and 16 filters: the default floor (8 channels, multiples of 4)
        # leaves 1.71x at most, so these small layers may go down to 2 channels, in steps of 1.
        Scenario(f"{subject}-channel-2x", subject, "channel", ("--target-speedup", "2.0"),
                 ("--trials", "8", "--finetune-epochs", "1", "--set", "channel.min_channels=2", "--set",
                  "channel.channel_multiple=1"), minutes=3),
        Scenario(f"{subject}-sparse-0.8", subject, "weight-sparse", ("--target-sparsity", "0.8"),
                 ("--trials", "4", "--finetune-epochs", "2"), minutes=6),
        Scenario(f"{subject}-uniform-int8", subject, "uniform", ("--target-bits", "8"),
                 ("--finetune-epochs", "1"), minutes=4),
    )

# ----------------------------------------------------------------------------- shared pretrained ResNets, CIFAR-10
add(
    Scenario("resnet20-channel-2x", "resnet20", "channel", ("--target-speedup", "2.0"),
             ("--trials", "10", "--finetune-epochs", "1"), minutes=8),
    # Torch-Pruning 1.6 on a PyTorch copy of the same weights (block-inner channels, global group-norm
    # ranking, our fine-tuning recipe and batches), as its users run it and with our distillation.
    Scenario("resnet20-torch-pruning-2x", "resnet20", "torch-pruning", ("--target-speedup", "2.0"),
             ("--finetune-epochs", "1"), peer=True, minutes=8),
    Scenario("resnet20-torch-pruning-2x-distill", "resnet20", "torch-pruning", ("--target-speedup", "2.0"),
             ("--finetune-epochs", "1", "--distill"), peer=True, minutes=9),
    Scenario("resnet20-l1-uniform-2x", "resnet20", "channel", ("--target-speedup", "2.0"),
             ("--trials", "1", "--finetune-epochs", "1", "--set", "channel.mode=uniform", "--set",
              "channel.criterion=l1", "--set", "channel.channel_multiple=1", "--set", "channel.min_channels=1"),
             minutes=4),
    Scenario("resnet20-sparse-0.75", "resnet20", "weight-sparse", ("--target-sparsity", "0.75"),
             ("--trials", "4", "--finetune-epochs", "3"), minutes=15),
    Scenario("resnet20-tfmot-prune-0.75", "resnet20", "tfmot-prune", ("--target-sparsity", "0.75"),
             ("--finetune-epochs", "3"), peer=True, minutes=10),
    Scenario("resnet20-uniform-int8", "resnet20", "uniform", ("--target-bits", "8"), ("--finetune-epochs", "1"),
             minutes=6),
    # The same QAT epoch in each precision (explicitly, whatever auto would pick here): the accuracy check
    # behind train.precision for QAT; report.json's qat_int8_accuracy is the QAT file's test accuracy.
    *(Scenario(f"resnet20-uniform-int8-{name}", "resnet20", "uniform", ("--target-bits", "8"),
               ("--finetune-epochs", "1", "--set", f"train.precision={name}"), minutes=15)
      for name in ("float32", "bfloat16")),
    Scenario("resnet20-tfmot-qat-int8", "resnet20", "tfmot-qat", (), ("--finetune-epochs", "1"), peer=True,
             minutes=6),
    Scenario("resnet20-tflite-ptq-int8", "resnet20", "tflite-ptq", (), peer=True, minutes=1),
    # Mixed low-bit: the searched allocation against 4 bits everywhere at the same budget.
    Scenario("resnet20-lowbit-4bit", "resnet20", "uniform", ("--target-bits", "4"),
             ("--trials", "6", "--finetune-epochs", "0.5"), minutes=15),
    # Distilled: BatchNorm trains under uniform.batchnorm=auto (frozen, distillation diverged on digits).
    Scenario("resnet20-lowbit-4bit-distill", "resnet20", "uniform", ("--target-bits", "4"),
             ("--trials", "6", "--finetune-epochs", "0.5", "--distill"), minutes=15),
    Scenario("resnet20-lowbit-4bit-everywhere", "resnet20", "uniform", ("--target-bits", "4"),
             ("--trials", "1", "--finetune-epochs", "0.5", "--set", "uniform.allocation=uniform"), minutes=12),
    Scenario("resnet20-nonuniform-4bit", "resnet20", "non-uniform", ("--target-bits", "4"),
             ("--trials", "4", "--finetune-epochs", "1"), minutes=30,
             published=Published("91.96% -> 91.70% (NonUniformQuantLearner, 4 bits, full GPU fine-tuning)",
                                 "PocketFlow docs")),
    Scenario("resnet20-product-quant-15x", "resnet20", "product-quant", ("--target-compression", "15"),
             ("--trials", "4", "--finetune-epochs", "2"), minutes=30),
    # Distillation at equal budget: the same 3x channel-pruned candidate with and without a teacher
    # (channel fine-tuning is distilled by default; the first row turns it off).
    Scenario("resnet20-channel-3x", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "1", "--finetune-epochs", "1", "--no-distill"), minutes=8),
    Scenario("resnet20-channel-3x-distill", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "1", "--finetune-epochs", "1", "--distill"), minutes=9),
    # What pruning the residual stream is worth: the same recipe with the stream's bands kept whole
    # (what the analysis could do before it saw through the zero-padding shortcuts).
    Scenario("resnet20-channel-3x-distill-blocks", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "1", "--finetune-epochs", "1", "--distill", "--set",
              'channel.protect=[conv1, "layer2.0.conv2[0:8]", "layer2.0.conv2[24:32]", "layer3.0.conv2[0:16]", '
              '"layer3.0.conv2[48:64]"]'), minutes=9),
    Scenario("resnet20-torch-pruning-3x-distill", "resnet20", "torch-pruning", ("--target-speedup", "3.0"),
             ("--finetune-epochs", "1", "--distill"), peer=True, minutes=9),
    Scenario("resnet56-channel-2.5x", "resnet56", "channel", ("--target-speedup", "2.5"),
             ("--trials", "12", "--finetune-epochs", "3"), minutes=40,
             published=Published("-0.4 points (ChannelPrunedLearner, full GPU fine-tuning)", "PocketFlow docs")),
    Scenario("resnet56-uniform-int8", "resnet56", "uniform", ("--target-bits", "8"), ("--finetune-epochs", "1"),
             minutes=12),
    Scenario("resnet56-tflite-ptq-int8", "resnet56", "tflite-ptq", (), peer=True, minutes=2),
)

# ----------------------------------------------------------------------------- the channel job on a user's budget
# Default settings (distilled fine-tuning, BatchNorm-recalibrated trial score) at the epoch budgets the
# acceptance of issue #16 fixes: ResNet-20 at 2x and 3x with 5 epochs, ResNet-56 at 2.5x with 10.
# The two ResNet-20 rows were measured with LASSO + re-fit, the default criterion before `auto` (which
# picks L1 at 5 epochs: the `resnet20-channel-l1-*-5ep` rows below are today's default there).
add(
    Scenario("resnet20-channel-2x-5ep", "resnet20", "channel", ("--target-speedup", "2.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=lasso"), minutes=25),
    Scenario("resnet20-channel-3x-5ep", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=lasso"), minutes=25),
    Scenario("resnet56-channel-2.5x-10ep", "resnet56", "channel", ("--target-speedup", "2.5"),
             ("--trials", "12", "--finetune-epochs", "10", "--set", "channel.criterion=lasso"), minutes=95),
    # What `auto` chooses for 10 epochs, pinned so that the row stays reproducible if the default moves.
    Scenario("resnet56-channel-l1-2.5x-10ep", "resnet56", "channel", ("--target-speedup", "2.5"),
             ("--trials", "12", "--finetune-epochs", "10", "--set", "channel.criterion=l1"), minutes=95),
    # The same with a latency target too: on a CPU whose runtime computes 32 output channels per tile,
    # 2.5x fewer MACs gave 1.39x lower latency (uniform widths); the predicted latency decides the widths.
    Scenario("resnet56-channel-l1-latency-2x-10ep", "resnet56", "channel",
             ("--target-speedup", "2.5", "--target-latency-speedup", "2.0"),
             ("--trials", "12", "--finetune-epochs", "10", "--set", "channel.criterion=l1"), minutes=70),
    # The peer at the same budgets, with our distillation in its fine-tuning (what the method is worth
    # apart from distillation), and uniform L1 filter pruning with our recovery recipe.
    Scenario("resnet20-torch-pruning-2x-5ep-distill", "resnet20", "torch-pruning", ("--target-speedup", "2.0"),
             ("--finetune-epochs", "5", "--distill"), peer=True, minutes=27),
    Scenario("resnet20-torch-pruning-3x-5ep-distill", "resnet20", "torch-pruning", ("--target-speedup", "3.0"),
             ("--finetune-epochs", "5", "--distill"), peer=True, minutes=27),
    Scenario("resnet20-l1-uniform-3x-distill", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "1", "--finetune-epochs", "1", "--distill", "--set", "channel.mode=uniform", "--set",
              "channel.criterion=l1", "--set", "channel.channel_multiple=1", "--set", "channel.min_channels=1"),
             minutes=8),
    Scenario("resnet20-l1-uniform-3x-5ep-distill", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "1", "--finetune-epochs", "5", "--distill", "--set", "channel.mode=uniform", "--set",
              "channel.criterion=l1", "--set", "channel.channel_multiple=1", "--set", "channel.min_channels=1"),
             minutes=22),
    # The same uniform widths (every group at one ratio, any channel count) chosen by LASSO with the
    # least-squares re-fit: separates the criterion from the widths in the two rows above.
    Scenario("resnet20-lasso-uniform-3x-5ep-distill", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "1", "--finetune-epochs", "5", "--distill", "--set", "channel.mode=uniform", "--set",
              "channel.criterion=lasso", "--set", "channel.channel_multiple=1", "--set", "channel.min_channels=1"),
             minutes=22),
    # The default search (searched widths, recalibrated score, distilled fine-tuning) with L1 selection
    # and no re-fit instead of LASSO + re-fit: whether the criterion, not the search, costs at 5 epochs.
    Scenario("resnet20-channel-l1-3x-5ep", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=l1"), minutes=22),
    Scenario("resnet20-channel-l1-2x-5ep", "resnet20", "channel", ("--target-speedup", "2.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=l1"), minutes=22),
    # The same with train.precision float32: beside the default (auto: the pruned model fine-tunes in
    # float32, the teacher in bfloat16 on AMX machines), the accuracy check behind train.precision.
    Scenario("resnet20-channel-l1-2x-5ep-float32", "resnet20", "channel", ("--target-speedup", "2.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=l1",
              "--set", "train.precision=float32"), minutes=22),
    # The same pair at one epoch, where the re-fit's better starting point has the least time to wash out.
    Scenario("resnet20-channel-3x-1ep", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "1", "--set", "channel.criterion=lasso"), minutes=9),
    Scenario("resnet20-channel-l1-3x-1ep", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "1", "--set", "channel.criterion=l1"), minutes=8),
    # ... and at 3 epochs, between the two budgets measured.
    Scenario("resnet20-channel-lasso-3x-3ep", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "3", "--set", "channel.criterion=lasso"), minutes=12),
    Scenario("resnet20-channel-l1-3x-3ep", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "3", "--set", "channel.criterion=l1"), minutes=12),
    # A second seed (search and fine-tuning) of the 5-epoch pair at 3x.
    Scenario("resnet20-channel-3x-5ep-seed1", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=lasso", "--seed", "1"),
             minutes=17),
    Scenario("resnet20-channel-l1-3x-5ep-seed1", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=l1", "--seed", "1"),
             minutes=15),
    # Issue #16's acceptance rows as a user runs them: default settings (20 trials, channel.criterion
    # auto, which is L1 at 5 epochs), only the fine-tuning budget fixed.
    Scenario("resnet20-channel-2x-5ep-default", "resnet20", "channel", ("--target-speedup", "2.0"),
             ("--finetune-epochs", "5"), minutes=10),
    Scenario("resnet20-channel-3x-5ep-default", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--finetune-epochs", "5"), minutes=10),
    # The energy criterion (the largest contributions to the readers' outputs, own weights, no re-fit)
    # beside the 5-epoch L1 rows above.
    Scenario("resnet20-channel-energy-3x-5ep", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=energy"), minutes=15),
    Scenario("resnet20-channel-energy-3x-5ep-seed1", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=energy", "--seed", "1"),
             minutes=15),
    Scenario("resnet20-channel-energy-2x-5ep", "resnet20", "channel", ("--target-speedup", "2.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=energy"), minutes=15),
    # LASSO's channels with their own weights (channel.refit=false): at the uniform reference's widths it
    # ended 0.5 points above L1 after 5 epochs (docs/channel-recovery.md); these rows put it through the search.
    Scenario("resnet20-channel-lasso-norefit-3x-5ep", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=lasso",
              "--set", "channel.refit=false"), minutes=15),
    Scenario("resnet20-channel-lasso-norefit-3x-5ep-seed1", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=lasso",
              "--set", "channel.refit=false", "--seed", "1"), minutes=15),
    Scenario("resnet20-channel-lasso-norefit-2x-5ep", "resnet20", "channel", ("--target-speedup", "2.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=lasso",
              "--set", "channel.refit=false"), minutes=15),
    # The L1 rows above with the distillation's temperature at 8 instead of 4: the same search and candidates
    # (the trial score does not distil), only the fine-tuning's soft targets differ.
    Scenario("resnet20-channel-l1-3x-5ep-t8", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=l1",
              "--distill-temperature", "8"), minutes=15),
    Scenario("resnet20-channel-l1-3x-5ep-seed1-t8", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=l1", "--seed", "1",
              "--distill-temperature", "8"), minutes=15),
    Scenario("resnet20-channel-l1-2x-5ep-t8", "resnet20", "channel", ("--target-speedup", "2.0"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel.criterion=l1",
              "--distill-temperature", "8"), minutes=15),
    # The default 3x row above distilled from the shared ResNet-56 (93.39%) instead of the ResNet-20 being
    # pruned (91.73%): the same search and candidate, a stronger teacher (--teacher).
    Scenario("resnet20-channel-3x-5ep-teacher56", "resnet20", "channel", ("--target-speedup", "3.0"),
             ("--finetune-epochs", "5", "--teacher", "{shared}/pretrained/resnet56_cifar10.h5"), minutes=40),
)

# ----------------------------------------------------------------------------- chains: a pruned model in int8
# The same pruning budget as the float rows above (5 and 10 fine-tuning epochs), of which the int8 stage's
# QAT takes chain.last_stage_share (20%); each row's report holds the pruned float file beside the int8 one.
add(
    Scenario("digits-channel-int8-2x", "digits_cnn", "channel+uniform", ("--target-speedup", "2.0"), quick=True,
             minutes=1),
    Scenario("resnet20-channel-int8-2x-5ep", "resnet20", "channel+uniform", ("--target-speedup", "2.0"),
             ("--trials", "10", "--finetune-epochs", "5"), minutes=20),
    Scenario("resnet56-channel-int8-2.5x-3ep", "resnet56", "channel+uniform", ("--target-speedup", "2.5"),
             ("--trials", "12", "--finetune-epochs", "3"), minutes=35),
    Scenario("resnet56-channel-int8-2.5x-10ep", "resnet56", "channel+uniform", ("--target-speedup", "2.5"),
             ("--trials", "12", "--finetune-epochs", "10"), minutes=95),
)

# ----------------------------------------------------------------------------- chains: pruned, then low-bit codes or zeros
# The second stage's target is --target-bits (or an overall --target-compression); the pruned float file of
# each row's report is the first stage alone; resnet20-nonuniform-4bit and resnet20-lowbit-4bit the second.
add(
    Scenario("digits-channel-lowbit-2x", "digits_cnn", "channel+uniform", ("--target-speedup", "2.0",
                                                                         "--target-bits", "4"), quick=True, minutes=1),
    Scenario("digits-channel-nonuniform-2x", "digits_cnn", "channel+non-uniform",
             ("--target-speedup", "2.0", "--target-bits", "4"), quick=True, minutes=1),
    Scenario("resnet20-channel-nonuniform-4bit-2x-5ep", "resnet20", "channel+non-uniform",
             ("--target-speedup", "2.0", "--target-bits", "4"), ("--trials", "10", "--finetune-epochs", "5"),
             minutes=25),
    Scenario("resnet20-channel-lowbit-4bit-2x-5ep", "resnet20", "channel+uniform",
             ("--target-speedup", "2.0", "--target-bits", "4"), ("--trials", "10", "--finetune-epochs", "5"),
             minutes=20),
    # Zeros then int8 values (weight-sparse's own int8 stage): the same search and training as
    # resnet20-sparse-0.75, so the pair separates what int8 adds.
    Scenario("digits-sparse-int8-0.8", "digits_cnn", "weight-sparse+uniform", ("--target-sparsity", "0.8"),
             quick=True, minutes=1),
    Scenario("resnet20-sparse-int8-0.75", "resnet20", "weight-sparse+uniform", ("--target-sparsity", "0.75"),
             ("--trials", "4", "--finetune-epochs", "3"), minutes=15),
    # The same run shipping the faster of the sparse and the dense int8 TFLite files (measured).
    Scenario("resnet20-sparse-int8-0.75-fast", "resnet20", "weight-sparse+uniform", ("--target-sparsity", "0.75"),
             ("--trials", "4", "--finetune-epochs", "3", "--set", "weight-sparse.format=fast"), minutes=15),
    Scenario("resnet20-channel-sparse-int8-2x-5ep", "resnet20", "channel+weight-sparse",
             ("--target-speedup", "2.0", "--target-sparsity", "0.75"),
             ("--trials", "10", "--finetune-epochs", "5", "--bits", "8", "--set", "weight-sparse.int8_mode=dynamic"),
             minutes=20),  # its row ran when dynamic-range was the default
    Scenario("resnet20-channel-nonuniform-14x-5ep", "resnet20", "channel+non-uniform",
             ("--target-speedup", "2.0", "--target-compression", "14"), ("--trials", "10", "--finetune-epochs", "5"),
             minutes=25),
)

# ----------------------------------------------------------------------------- chains: an overall size at fixed bits
# --target-bits fixes the last stage's width, so the pruning makes up the rest of --target-compression: it
# searches under a float-file budget sized before training (learners/chain.py, pruning_compression).
add(
    Scenario("resnet20-channel-nonuniform-4bit-14x-5ep", "resnet20", "channel+non-uniform",
             ("--target-speedup", "2.0", "--target-bits", "4", "--target-compression", "14"),
             ("--trials", "10", "--finetune-epochs", "5"), minutes=12),
    # The same 14x overall as resnet20-channel-nonuniform-14x-5ep with both stages searched together:
    # each trial's pruned candidate gets its proposed codebook widths and is scored as a codebook model.
    Scenario("resnet20-channel-nonuniform-14x-5ep-joint", "resnet20", "channel+non-uniform",
             ("--target-speedup", "2.0", "--target-compression", "14"),
             ("--trials", "10", "--finetune-epochs", "5", "--set", "channel+non-uniform.search=joint"), minutes=15),
    Scenario("resnet56-channel-int8-9x-3ep", "resnet56", "channel+uniform",
             ("--target-speedup", "2.5", "--target-bits", "8", "--target-compression", "9"),
             ("--trials", "12", "--finetune-epochs", "3"), minutes=25),
    # An overall latency target: the int8 file's time, predicted from the original's and the reference
    # candidate's files timed before training, sets the float speedup the pruning plans for (latency_split).
    Scenario("resnet56-channel-int8-latency-2.45x-3ep", "resnet56", "channel+uniform",
             ("--target-latency-speedup", "2.45"), ("--trials", "12", "--finetune-epochs", "3"), minutes=25),
)


def select(names: List[str], quick: bool, shared_available: bool) -> List[Scenario]:
    """The scenarios to run: named ones, or all (quick: the quick ones); shared-data ones need the data."""
    if names:
        chosen = [SCENARIOS.get(name) for name in names]
    else:
        chosen = [SCENARIOS.get(name) for name in ORDER if SCENARIOS.get(name).quick or not quick]
    return [s for s in chosen if shared_available or not s.needs_shared()]


def published_figures() -> Dict[str, Published]:
    return {name: SCENARIOS.get(name).published for name in ORDER if SCENARIOS.get(name).published}
