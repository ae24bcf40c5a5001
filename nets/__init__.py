"""Built-in nets: name -> NetSpec (builder, default dataset, default training schedule).

A builder takes the dataset's input shape and class count, so one net works on any dataset
whose images it can take (``mobilenet_v1`` on 32x32 CIFAR or 224x224 ImageNet).
"""

from __future__ import annotations

from nets.base import NETS, NetSpec, Schedule, register_net

# Builders register on import.
from nets import digits_cnn, lenet, mobilenet, resnet_cifar  # noqa: E402,F401

__all__ = ["NETS", "NetSpec", "Schedule", "register_net"]
