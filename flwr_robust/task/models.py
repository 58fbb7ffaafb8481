"""Small torch models for the bundled datasets, and weight conversion to/from numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "MODELS",
    "build_model",
    "default_model",
    "get_named_weights",
    "get_weights",
    "set_weights",
]

MODELS: tuple[str, ...] = ("mlp", "cnn")
_MLP_HIDDEN = 64
_CNN_CHANNELS = (16, 32)


class MLP(nn.Module):
    """Flatten, one hidden ReLU layer, linear classifier."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(c * h * w, _MLP_HIDDEN)
        self.out = nn.Linear(_MLP_HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images (N, C, H, W)."""
        return self.out(torch.relu(self.hidden(self.flatten(x))))


class CNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks and a linear classifier.

    Works for any image side >= 4 (8x8 digits: 4.8k parameters; 28x28 Fashion-MNIST: 20.5k).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        c1, c2 = _CNN_CHANNELS
        self.conv1 = nn.Conv2d(c, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(c2 * (h // 4) * (w // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images (N, C, H, W)."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.out(self.flatten(x))


def build_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    seed: int | None = None,
) -> nn.Module:
    """Build a freshly initialised CPU model.

    Parameters
    ----------
    name : {"mlp", "cnn"}
        ``"mlp"``: flatten + one hidden layer of 64 units. ``"cnn"``: two conv blocks
        (16 and 32 channels) and a linear head; needs image sides >= 4.
    input_shape : tuple[int, int, int]
        Shape (C, H, W) of one input image, e.g. ``Dataset.input_shape``.
    num_classes : int
        Number of output logits, >= 2.
    seed : int or None, default=None
        Seed of the initialisation; the same seed gives identical weights. The global torch
        random state is left untouched when a seed is given. ``None`` draws from it.

    Returns
    -------
    torch.nn.Module
        The model, in training mode, with float32 parameters.
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {list(MODELS)}, got {name!r}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int | np.integer) and d >= 1 for d in shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape!r}")
    if name == "cnn" and min(shape[1:]) < 4:
        raise ValueError(f"input_shape for 'cnn' needs H, W >= 4, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    c, h, w = (int(d) for d in shape)
    factory = MLP if name == "mlp" else CNN
    if seed is None:
        return factory((c, h, w), num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory((c, h, w), num_classes)


def default_model(dataset_name: str) -> str:
    """Return the model name suited to a dataset.

    Parameters
    ----------
    dataset_name : str
        A dataset name accepted by :func:`flwr_robust.task.data.load_dataset`.

    Returns
    -------
    str
        ``"cnn"`` for ``fashion_mnist`` and ``hf:...`` image datasets, ``"mlp"`` for ``digits``
        and ``synthetic``.
    """
    if dataset_name in ("digits", "synthetic"):
        return "mlp"
    if dataset_name == "fashion_mnist" or dataset_name.startswith("hf:"):
        return "cnn"
    raise ValueError(
        f"dataset_name must be one of ['digits', 'synthetic', 'fashion_mnist', 'hf:<id>'], "
        f"got {dataset_name!r}"
    )


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Return float32 copies of every state_dict entry, in state_dict order.

    Parameters
    ----------
    model : torch.nn.Module
        The model to read.

    Returns
    -------
    list[np.ndarray]
        One array per entry; changing them does not change the model.
    """
    return list(get_named_weights(model).values())


def get_named_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Return float32 copies of every state_dict entry keyed by name, in state_dict order.

    Parameters
    ----------
    model : torch.nn.Module
        The model to read.

    Returns
    -------
    dict[str, np.ndarray]
        Entry name to array copy.
    """
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in model.state_dict().items()
    }


def set_weights(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays into the model's state_dict entries, in state_dict order.

    Parameters
    ----------
    model : torch.nn.Module
        The model to update in place.
    arrays : sequence of np.ndarray
        One array per state_dict entry with exactly that entry's shape; values are cast to the
        entry's dtype and copied.

    Raises
    ------
    ValueError
        When the number of arrays or any shape differs from the model's.
    """
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"arrays must hold {len(state)} arrays (one per layer), got {len(arrays)}")
    new_state = {}
    for (name, tensor), array in zip(state.items(), arrays, strict=True):
        array = np.asarray(array)
        if tuple(array.shape) != tuple(tensor.shape):
            raise ValueError(
                f"arrays: layer {name!r} needs shape {tuple(tensor.shape)}, got {array.shape}"
            )
        new_state[name] = torch.tensor(array, dtype=tensor.dtype)
    model.load_state_dict(new_state, strict=True)
