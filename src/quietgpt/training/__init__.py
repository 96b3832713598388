"""Training: the nanoGPT loop (loop.py: `train`, see its docstring for the map of the parts) and its parts, for
callers that take steps themselves: benchmarks/train_gpu.py times the same train_step that train() runs.

    parts = build_step_parts(model, tc, device)          # optimizer, GradScaler, autocast, compile
    guard = NonFiniteGuard(tc, device)                   # train.nonfinite's policy
    result = train_step(parts, [(x, y)], it=0, lr=tc.learning_rate, guard=guard)
"""

from quietgpt.training.loop import train
from quietgpt.training.state import TrainState
from quietgpt.training.step import NonFiniteError, NonFiniteGuard, StepParts, StepResult, build_step_parts, train_step

__all__ = ["NonFiniteError", "NonFiniteGuard", "StepParts", "StepResult", "TrainState", "build_step_parts",
           "train", "train_step"]
