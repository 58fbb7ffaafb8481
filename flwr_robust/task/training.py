"""Local training, evaluation and prediction on CPU (plain SGD + cross-entropy).

These functions never change torch's global settings (threads, default dtype, RNG): the Flower
apps decide those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from flwr_robust.task.data import Dataset

__all__ = ["evaluate", "predict", "train"]


def train(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int = 32,
    seed: int = 0,
    momentum: float = 0.0,
    gradient_mask: Mapping[str, np.ndarray] | None = None,
    proximal_anchor: Mapping[str, np.ndarray] | None = None,
    anomaly_weight: float = 0.0,
) -> dict[str, float]:
    """Train ``model`` in place with mini-batch SGD on cross-entropy.

    Two optional changes serve attacks (honest training uses neither and runs the plain loop):
    ``gradient_mask`` multiplies every parameter's gradient after the backward pass and before
    the step (Neurotoxin's projection: with a 0/1 mask the zeroed coordinates never move, as
    SGD's momentum buffer only ever sees zeros there), and ``proximal_anchor`` with
    ``anomaly_weight`` ``w`` trains on ``(1 - w) * cross_entropy + w * ||theta - anchor||_2``
    (the anomaly-evasion loss of Bagdasaryan et al. with ``alpha = 1 - w``).

    Parameters
    ----------
    model : torch.nn.Module
        A CPU model mapping (N, C, H, W) float32 images to class logits.
    data : Dataset
        The training data; must not be empty.
    epochs : int
        Passes over the data, >= 1.
    learning_rate : float
        SGD step size, > 0.
    batch_size : int, default=32
        Mini-batch size, >= 1 (the last batch of an epoch may be smaller).
    seed : int, default=0
        Seed of the per-epoch shuffling (a private ``torch.Generator``).
    momentum : float, default=0.0
        SGD momentum, in [0, 1).
    gradient_mask : mapping of str to np.ndarray, optional
        Parameter name (as in ``model.named_parameters()``) to a finite array of the
        parameter's shape; parameters without an entry are not masked.
    proximal_anchor : mapping of str to np.ndarray, optional
        Parameter name to the anchor's values (e.g. the global model), one entry per
        parameter; required when ``anomaly_weight > 0``.
    anomaly_weight : float, default=0.0
        Weight ``w`` of the L2 distance to ``proximal_anchor``, in [0, 1).

    Returns
    -------
    dict[str, float]
        ``loss`` and ``accuracy``: mean cross-entropy (without the distance term) and accuracy
        over the last epoch's batches (measured while training); ``num_examples``:
        ``len(data)`` (an int).
    """
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if not (
        isinstance(learning_rate, int | float)
        and math.isfinite(learning_rate)
        and learning_rate > 0
    ):
        raise ValueError(f"learning_rate must be a finite float > 0, got {learning_rate!r}")
    if not (isinstance(momentum, int | float) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
    n = len(data)
    if n == 0:
        raise ValueError("data must hold at least one sample")
    parameters = dict(model.named_parameters())
    masks = _parameter_tensors("gradient_mask", gradient_mask, parameters, complete=False)
    anchor = _proximal_terms(proximal_anchor, anomaly_weight, parameters)
    x = torch.tensor(data.x)
    y = torch.tensor(data.y)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    model.train()
    total_loss = torch.zeros(())
    correct = torch.zeros((), dtype=torch.int64)
    for _ in range(epochs):
        total_loss.zero_()
        correct.zero_()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            if anchor:
                # vector_norm's gradient at 0 is 0 (sqrt of a sum of squares would give NaN
                # at the first step, where the model equals the anchor).
                distance = torch.linalg.vector_norm(
                    torch.cat([(parameters[k] - a).reshape(-1) for k, a in anchor.items()])
                )
                ((1.0 - anomaly_weight) * loss + anomaly_weight * distance).backward()
            else:
                loss.backward()
            for name, mask in masks.items():
                grad = parameters[name].grad
                if grad is not None:
                    grad.mul_(mask)
            optimizer.step()
            total_loss += loss.detach() * len(idx)
            correct += (logits.detach().argmax(dim=1) == y[idx]).sum()
    return {
        "loss": float(total_loss) / n,
        "accuracy": float(correct) / n,
        "num_examples": n,
    }


def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 256) -> tuple[float, float]:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on ``data``.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is left in evaluation mode.
    data : Dataset
        The evaluation data; must not be empty.
    batch_size : int, default=256
        Samples per forward pass, >= 1.

    Returns
    -------
    tuple[float, float]
        (loss, accuracy), accuracy in [0, 1].
    """
    _check_positive_int("batch_size", batch_size)
    n = len(data)
    if n == 0:
        raise ValueError("data must hold at least one sample")
    model.eval()
    total_loss = 0.0
    correct = 0
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = torch.tensor(data.x[start : start + batch_size])
            y = torch.tensor(data.y[start : start + batch_size])
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    return total_loss / n, correct / n


def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Return the predicted label of every image.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is left in evaluation mode.
    x : np.ndarray
        Images of shape (N, C, H, W); cast to float32.
    batch_size : int, default=256
        Samples per forward pass, >= 1.

    Returns
    -------
    np.ndarray
        int64 labels, shape (N,).
    """
    _check_positive_int("batch_size", batch_size)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got shape {x.shape}")
    model.eval()
    out = np.empty(len(x), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            logits = model(torch.tensor(x[start : start + batch_size]))
            out[start : start + batch_size] = logits.argmax(dim=1).numpy()
    return out


def _parameter_tensors(
    param: str,
    arrays: Mapping[str, np.ndarray] | None,
    parameters: Mapping[str, nn.Parameter],
    *,
    complete: bool,
) -> dict[str, torch.Tensor]:
    """``arrays`` as detached tensors of the parameters' dtypes, names and shapes checked."""
    if arrays is None:
        return {}
    unknown = sorted(set(arrays) - set(parameters))
    missing = sorted(set(parameters) - set(arrays)) if complete else []
    if unknown or missing:
        raise ValueError(
            f"{param} must be keyed by the model's parameter names; unknown: {unknown}, "
            f"missing: {missing}"
        )
    out = {}
    for name, array in arrays.items():
        target = parameters[name]
        value = np.asarray(array)
        if value.shape != tuple(target.shape):
            raise ValueError(
                f"{param}[{name!r}] has shape {value.shape}, the parameter {tuple(target.shape)}"
            )
        if not np.isfinite(value).all():
            raise ValueError(f"{param}[{name!r}] holds non-finite values")
        out[name] = torch.tensor(value, dtype=target.dtype)
    return out


def _proximal_terms(
    anchor: Mapping[str, np.ndarray] | None,
    weight: float,
    parameters: Mapping[str, nn.Parameter],
) -> dict[str, torch.Tensor]:
    """The anchor tensors of the distance term (empty when the term is off)."""
    if not (isinstance(weight, int | float) and 0.0 <= weight < 1.0):
        raise ValueError(f"anomaly_weight must be a float in [0, 1), got {weight!r}")
    if weight > 0 and anchor is None:
        raise ValueError("anomaly_weight > 0 needs proximal_anchor")
    if weight == 0:
        return {}
    return _parameter_tensors("proximal_anchor", anchor, parameters, complete=True)


def _check_positive_int(param: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{param} must be an int >= 1, got {value!r}")
