"""An experiment, not an option (docs/channel-recovery.md, 2026-12-05: it moved nothing): main.py with
an exponential moving average of the weights during the channel learner's fine-tuning. The average
replaces the weights at the end, then the learner re-estimates BatchNorm statistics for them.

    EMA_DECAY=0.998 python scripts/experiments/ema_finetune.py MAIN.PY ARGUMENTS
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import learners.channel_pruning.learner as channel_learner  # noqa: E402  (pocketflow first: its Keras)
from pocketflow.cli import main  # noqa: E402
import tensorflow as tf  # noqa: E402

DECAY = float(os.environ.get("EMA_DECAY", "0.998"))
original_train = channel_learner.train


def train_with_average(model, data, schedule, *, description="train", after_step=None, **options):
    if description != "fine-tune":
        return original_train(model, data, schedule, description=description, after_step=after_step, **options)
    variables = model.trainable_variables
    shadows = [tf.Variable(v.read_value(), trainable=False) for v in variables]
    count = tf.Variable(0.0)

    @tf.function
    def update():
        count.assign_add(1.0)
        decay = tf.minimum(DECAY, (1.0 + count) / (10.0 + count))
        for shadow, variable in zip(shadows, variables):
            shadow.assign(decay * shadow + (1.0 - decay) * variable)

    losses = original_train(model, data, schedule, description=description, after_step=update, **options)
    for shadow, variable in zip(shadows, variables):
        variable.assign(shadow)
    print(f"EMA {DECAY}: averaged weights swapped in after {int(count.numpy())} steps", flush=True)
    return losses


channel_learner.train = train_with_average
sys.exit(main())
