"""Torch-Pruning (PyPI ``torch-pruning``, 1.6.x) as a benchmark peer, on the same weights and data.

The shared CIFAR ResNets come from akamaster/pytorch_resnet_cifar10's definition, so the Keras
model is rebuilt in PyTorch with that definition (option-A shortcuts: subsample, zero-pad the
channels) and its weights copied; the copy must score the Keras model's test accuracy, or the
run stops. Then, as Torch-Pruning's users run it: group-norm importance
(``GroupMagnitudeImportance(p=2)``), global ranking, the pruning ratio bisected until the MACs
reach the target. Its dependency graph does not see through the zero-padding shortcut, so its
users leave the residual stream alone: the stem conv, every block's last conv and the classifier
are ``ignored_layers``, and the blocks' inner channels are pruned. Fine-tuning runs in PyTorch
with our recipe (SGD with Nesterov momentum, the fine-tuning learning rate on a cosine, weight
decay on the kernels, the same batches from our tf.data pipeline, distilled from the unpruned
copy only when ``--distill`` is given). The fine-tuned weights go back into a Keras model of the
same widths (our surgery builds it), so the peer ships a TFLite file measured like ours.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import tensorflow as tf

from pocketflow.errors import ConfigError
from pocketflow.metrics import count_macs
from pocketflow.training import accuracy

log = logging.getLogger(__name__)

ACCURACY_TOLERANCE = 0.001  # the PyTorch copy must match the Keras model's test accuracy this closely


def _torch():
    try:
        import torch
        import torch_pruning
    except ImportError as error:  # pragma: no cover - depends on the machine
        raise ConfigError(f"the torch-pruning peer needs PyTorch and torch-pruning ({error}); "
                          "run scripts/install.sh") from None
    return torch, torch_pruning


def _stages(model: tf.keras.Model) -> List[List[Tuple[int, int, int]]]:
    """(in, out, stride) of every block, stage by stage, read from layer names layerS.B.conv1."""
    stages: Dict[int, List[Tuple[int, int, int]]] = {}
    for layer in model.layers:
        parts = layer.name.split(".")
        if len(parts) == 3 and parts[0].startswith("layer") and parts[2] == "conv1":
            stage, block = int(parts[0][5:]), int(parts[1])
            stages.setdefault(stage, []).append((block, int(layer.input_shape[-1]), layer.filters,
                                                 layer.strides[0]))
    if not stages:
        raise ConfigError("the torch-pruning peer rebuilds CIFAR ResNets named like akamaster's "
                          "(conv1, layerS.B.conv1, linear); this model is not one")
    return [[(cin, cout, stride) for _, cin, cout, stride in sorted(blocks)] for _, blocks in sorted(stages.items())]


def build_torch_resnet(model: tf.keras.Model):
    """The akamaster CIFAR ResNet of ``model``'s shape in PyTorch, with ``model``'s weights."""
    torch, _ = _torch()
    nn, functional = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None

        def forward(self, x):
            out = functional.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x if self.pad is None else functional.pad(x[:, :, ::2, ::2],
                                                                 (0, 0, 0, 0, self.pad, self.pad))
            return functional.relu(out + shortcut)

    class ResNet(nn.Module):
        def __init__(self, stages, classes: int, stem: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(stem)
            for index, blocks in enumerate(stages, start=1):
                setattr(self, f"layer{index}", nn.Sequential(*[Block(*block) for block in blocks]))
            self.stage_count = len(stages)
            self.linear = nn.Linear(stages[-1][-1][1], classes)

        def forward(self, x):
            x = functional.relu(self.bn1(self.conv1(x)))
            for index in range(1, self.stage_count + 1):
                x = getattr(self, f"layer{index}")(x)
            return self.linear(functional.adaptive_avg_pool2d(x, 1).flatten(1))

    stages = _stages(model)
    net = ResNet(stages, int(model.output_shape[-1]), int(model.get_layer("conv1").filters))
    copy_weights(model, net, to_torch=True)
    return net


def copy_weights(keras_model: tf.keras.Model, net, to_torch: bool) -> None:
    """Copy every conv, BatchNorm and the classifier between the two models (names match)."""
    torch, _ = _torch()
    modules = dict(net.named_modules())
    for name, module in modules.items():
        if not name or not isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)):
            continue
        layer = keras_model.get_layer(name)
        if isinstance(module, torch.nn.Conv2d):
            if to_torch:
                module.weight.data = torch.from_numpy(np.transpose(layer.get_weights()[0], (3, 2, 0, 1)).copy())
            else:
                layer.set_weights([np.transpose(module.weight.detach().numpy(), (2, 3, 1, 0))])
        elif isinstance(module, torch.nn.BatchNorm2d):
            if to_torch:
                gamma, beta, mean, variance = layer.get_weights()
                for tensor, value in ((module.weight, gamma), (module.bias, beta), (module.running_mean, mean),
                                      (module.running_var, variance)):
                    tensor.data = torch.from_numpy(np.array(value))
                module.eps = float(layer.epsilon)
            else:
                layer.set_weights([t.detach().numpy() for t in (module.weight, module.bias, module.running_mean,
                                                                module.running_var)])
        else:
            if to_torch:
                kernel, bias = layer.get_weights()
                module.weight.data = torch.from_numpy(kernel.T.copy())
                module.bias.data = torch.from_numpy(bias.copy())
            else:
                layer.set_weights([module.weight.detach().numpy().T, module.bias.detach().numpy()])


def torch_macs(net, image_shape: Tuple[int, ...]) -> int:
    """Conv and Linear multiply-accumulates for one image (``pocketflow.metrics``' convention)."""
    torch, _ = _torch()
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.weight.shape[2] * module.weight.shape[3]
            total[0] += int(output.shape[2] * output.shape[3] * kernel * module.in_channels * module.out_channels
                            // module.groups)
        else:
            total[0] += int(module.in_features * module.out_features)

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net.eval()
        net(torch.zeros((1,) + image_shape))
    for handle in handles:
        handle.remove()
    return total[0]


def _nchw(images) -> Any:
    torch, _ = _torch()
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(images), (0, 3, 1, 2))))


def torch_accuracy(net, batches: tf.data.Dataset) -> float:
    torch, _ = _torch()
    net.eval()
    correct = seen = 0
    with torch.no_grad():
        for images, labels in batches:
            predictions = net(_nchw(images)).argmax(dim=1).numpy()
            correct += int((predictions == labels.numpy()).sum())
            seen += len(predictions)
    return correct / max(seen, 1)


def prune_to_target(net, speedup: float, image_shape: Tuple[int, ...]):
    """A pruned copy of ``net`` whose MAC speedup is the smallest >= ``speedup`` the ratio reaches."""
    torch, tp = _torch()
    base = torch_macs(net, image_shape)
    example = torch.zeros((1,) + image_shape)

    def pruned_at(ratio: float):
        candidate = copy.deepcopy(net)
        ignored = [candidate.conv1, candidate.linear] + [m.conv2 for m in candidate.modules() if hasattr(m, "pad")]
        pruner = tp.pruner.MetaPruner(candidate, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, global_pruning=True, ignored_layers=ignored)
        pruner.step()
        return candidate

    low, high = 0.0, 0.99
    best = None
    for _ in range(14):
        middle = (low + high) / 2
        candidate = pruned_at(middle)
        if base / torch_macs(candidate, image_shape) >= speedup:
            best, high = candidate, middle
        else:
            low = middle
    if best is None:
        raise ConfigError(f"torch-pruning cannot reach {speedup}x MACs with the residual stream kept")
    return best, base / torch_macs(best, image_shape), high


def finetune(net, run, epochs: float, teacher=None) -> List[float]:
    """Our fine-tuning recipe in PyTorch, on our tf.data batches (augmented as ours are)."""
    torch, _ = _torch()
    schedule = run.finetune_schedule()
    batch_size = min(schedule.batch_size, run.dataset.num_train)
    steps_per_epoch = max(1, run.dataset.num_train // batch_size)
    total_steps = max(1, int(math.ceil(epochs * steps_per_epoch)))
    kernels = [p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]
    others = [p for n, p in net.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    optimizer = torch.optim.SGD([{"params": kernels, "weight_decay": schedule.weight_decay},
                                 {"params": others, "weight_decay": 0.0}],
                                lr=schedule.learning_rate, momentum=0.9, nesterov=True)
    cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    distill = run.config.distillation
    temperature, alpha = float(distill.temperature), float(distill.alpha)
    if teacher is not None:
        teacher.eval()
    batches = run.dataset.train(batch_size, shuffle=True, augment=schedule.augment, seed=run.config.seed,
                                repeat=True)
    torch.manual_seed(run.config.seed)
    net.train()
    losses, started = [], time.time()
    for step, (images, labels) in enumerate(batches.take(total_steps), start=1):
        inputs, targets = _nchw(images), torch.from_numpy(labels.numpy().astype(np.int64))
        logits = net(inputs)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        if teacher is not None:
            with torch.no_grad():
                soft = torch.nn.functional.softmax(teacher(inputs) / temperature, dim=1)
            kl = torch.nn.functional.kl_div(torch.nn.functional.log_softmax(logits / temperature, dim=1), soft,
                                            reduction="batchmean")
            loss = alpha * temperature ** 2 * kl + (1 - alpha) * loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cosine.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == total_steps:
            log.info("torch-pruning fine-tune step %d/%d loss %.4f (%.0fs)", step, total_steps,
                     float(np.mean(losses[-50:])), time.time() - started)
    return losses


def to_keras(baseline: tf.keras.Model, net) -> tf.keras.Model:
    """A Keras model of ``net``'s widths (our surgery keeps the first channels) with ``net``'s weights."""
    from learners.channel_pruning.graph import analyze
    from learners.channel_pruning.surgery import prune

    analysis = analyze(baseline)
    widths = {name: module.out_channels for name, module in net.named_modules() if name.endswith(".conv1")}
    keep = {name: np.arange(widths[name]) for name in analysis.groups if name in widths}
    model = prune(baseline, keep, analysis=analysis)
    copy_weights(model, net, to_torch=False)
    return model


def run_torch_pruning(run) -> Dict[str, Any]:
    """The peer: prune with Torch-Pruning to the MAC target, fine-tune, ship a TFLite file."""
    torch, tp = _torch()
    torch.set_num_threads(max(1, tf.config.threading.get_intra_op_parallelism_threads() or 2))
    speedup = run.config.target.speedup
    if speedup is None:
        raise ConfigError("the torch-pruning peer needs --target-speedup")
    epochs = run.finetune_schedule().epochs
    net = build_torch_resnet(run.baseline)
    keras_accuracy = accuracy(run.baseline, run.dataset.test(256))
    copy_accuracy = torch_accuracy(net, run.dataset.test(256))
    log.info("PyTorch copy of the baseline: test accuracy %.4f (Keras %.4f)", copy_accuracy, keras_accuracy)
    if abs(copy_accuracy - keras_accuracy) > ACCURACY_TOLERANCE:
        raise RuntimeError(f"the PyTorch copy scores {copy_accuracy:.4f}, the Keras model {keras_accuracy:.4f}: "
                           "the rebuild is wrong")
    image_shape = (run.dataset.input_shape[2], run.dataset.input_shape[0], run.dataset.input_shape[1])
    pruned, reached, ratio = prune_to_target(net, speedup, image_shape)
    before = torch_accuracy(pruned, run.dataset.validation(256))
    log.info("torch-pruning: ratio %.3f, %.2fx MACs; validation accuracy before fine-tuning %.4f",
             ratio, reached, before)
    teacher = net if run.config.distillation.enabled is True else None
    finetune(pruned, run, epochs, teacher=teacher)
    torch_test = torch_accuracy(pruned, run.dataset.test(256))
    model = to_keras(run.baseline, pruned)
    shipped = run.measure(model, "torch_pruning", "float")
    return {"accuracy": shipped.accuracy, "shipped": shipped, "shipped_format": "float TFLite (weights from PyTorch)",
            "mac_speedup": count_macs(run.baseline) / count_macs(model),
            "pytorch_copy_accuracy": copy_accuracy, "pytorch_test_accuracy": torch_test,
            "validation_before_finetuning": before, "pruning_ratio": ratio, "distilled": teacher is not None,
            "torch_pruning_version": tp.__version__}
