"""The PyTorch tabular network, its training loop, per-epoch checkpoints and device choice.

The loop is written to survive preemption: after every epoch it writes one checkpoint (model,
optimiser, LR scheduler, gradient scaler, early-stopping state and every random generator
state) to a temporary file, fsyncs it and renames it over the previous one, so a crash leaves
either the old or the new checkpoint, never half of one. Started again with the same inputs,
the loop resumes after the last finished epoch and, on the CPU, ends with bit-identical weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"
EVAL_BATCH_ROWS = 65_536


class DeviceError(RuntimeError):
    """The requested torch device is not available here."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint in the folder belongs to a different fit (other data or parameters)."""


def select_device(preference: str = "auto") -> str:
    """The torch device to train on: ``auto`` takes CUDA when torch sees a GPU, else the CPU.

    Args:
        preference: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    preference = preference.strip().lower()
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cpu":
        return "cpu"
    if preference == "cuda" or preference.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {preference!r} requested but torch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                "use 'auto' to fall back to the CPU"
            )
        index = int(preference.split(":", 1)[1]) if ":" in preference else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {preference!r} requested but only {torch.cuda.device_count()} GPUs exist"
            )
        return preference
    raise DeviceError(f"unknown device {preference!r}; use auto, cpu, cuda or cuda:N")


def mixed_precision_dtype(device: str) -> torch.dtype | None:
    """The autocast dtype on a GPU (bfloat16 where supported, else float16); None on the CPU."""
    if not device.startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class MonotoneBlock(nn.Module):
    """A small network that is non-decreasing in every input.

    Non-negative weights (softplus of free parameters) and a non-decreasing activation keep
    the output from falling when any input rises.
    """

    def __init__(self, inputs: int, units: int) -> None:
        super().__init__()
        self.hidden_weight = nn.Parameter(torch.randn(inputs, units) * 0.5 - 1.0)
        self.hidden_bias = nn.Parameter(torch.zeros(units))
        self.output_weight = nn.Parameter(torch.randn(units, 1) * 0.5 - 1.0)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(values @ nn.functional.softplus(self.hidden_weight) + self.hidden_bias)
        return (hidden @ nn.functional.softplus(self.output_weight)).squeeze(-1)


class TabularNet(nn.Module):
    """Embeddings for categories and an MLP for free numbers, plus a monotone block; one logit.

    Args:
        free_inputs: Width of the standardised free numbers plus missing flags.
        monotone_inputs: How many features the score must not decrease in.
        cardinalities: Embedding table size per categorical feature (code 0 = unknown).
        embedding_dim: Width of every embedding.
        hidden_units: Width of the hidden layers.
        layers: Number of hidden layers.
        dropout: Dropout after every hidden layer.
        monotone_units: Width of the monotone block.
    """

    def __init__(
        self,
        free_inputs: int,
        monotone_inputs: int,
        cardinalities: list[int],
        embedding_dim: int = 4,
        hidden_units: int = 128,
        layers: int = 2,
        dropout: float = 0.1,
        monotone_units: int = 8,
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(size, embedding_dim) for size in cardinalities)
        blocks: list[nn.Module] = []
        width = free_inputs + embedding_dim * len(cardinalities)
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden_units), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_units
        blocks.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*blocks)
        self.monotone = MonotoneBlock(monotone_inputs, monotone_units)

    def forward(
        self, free: torch.Tensor, monotone: torch.Tensor, categories: torch.Tensor
    ) -> torch.Tensor:
        embedded = [table(categories[:, i]) for i, table in enumerate(self.embeddings)]
        hidden = torch.cat([free, *embedded], dim=1)
        return self.mlp(hidden).squeeze(-1) + self.monotone(monotone)


class NetArrays(NamedTuple):
    """One window's network inputs and labels as NumPy arrays."""

    free: np.ndarray
    monotone: np.ndarray
    categories: np.ndarray
    labels: np.ndarray


@dataclass
class NetworkFit:
    """The best network (on the CPU, in eval mode) and how training went."""

    network: TabularNet
    best_score: float
    best_epoch: int
    epochs_run: int
    resumed_from_epoch: int
    epoch_seconds: list[float]
    history: list[dict[str, float]]
    mixed_precision: str


def fingerprint(arrays: tuple[NetArrays, NetArrays], settings: dict[str, Any]) -> str:
    """Hash of the data and settings, so a checkpoint only resumes the fit it came from."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for window in arrays:
        for array in window:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: temp file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only``: tensors and plain containers, no pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_states(shuffle: torch.Generator, device: str) -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.startswith("cuda") else [],
        "shuffle": shuffle.get_state(),
        "numpy": {
            "key": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": random.getstate(),
    }


def _restore_rng_states(states: dict[str, Any], shuffle: torch.Generator, device: str) -> None:
    torch.set_rng_state(states["torch"])
    if device.startswith("cuda") and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    shuffle.set_state(states["shuffle"])
    saved = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            saved["key"].numpy().astype(np.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _to_device(arrays: NetArrays, device: torch.device) -> tuple[torch.Tensor, ...]:
    return (
        torch.from_numpy(arrays.free).to(device),
        torch.from_numpy(arrays.monotone).to(device),
        torch.from_numpy(arrays.categories).to(device),
        torch.from_numpy(arrays.labels.astype(np.float32)).to(device),
    )


def _validation_auc(
    network: TabularNet,
    tensors: tuple[torch.Tensor, ...],
    amp_dtype: torch.dtype | None,
) -> float:
    from sklearn.metrics import roc_auc_score

    free, monotone, categories, labels = tensors
    network.eval()
    outputs = []
    with (
        torch.inference_mode(),
        torch.autocast(
            device_type=free.device.type, dtype=amp_dtype, enabled=amp_dtype is not None
        ),
    ):
        for start in range(0, len(labels), EVAL_BATCH_ROWS):
            stop = start + EVAL_BATCH_ROWS
            outputs.append(network(free[start:stop], monotone[start:stop], categories[start:stop]))
    scores = torch.cat(outputs).float().cpu().numpy()
    if not np.isfinite(scores).all():
        return math.nan
    return float(roc_auc_score(labels.cpu().numpy(), scores))


def fit_network(
    train: NetArrays,
    validation: NetArrays,
    *,
    architecture: dict[str, Any],
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    pos_weight: float,
    seed: int,
    max_epochs: int,
    patience: int,
    device: str = "cpu",
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    num_threads: int = 1,
) -> NetworkFit:
    """Train `TabularNet` with AdamW, weighted BCE, LR decay on plateau and early stopping.

    Args:
        train: Training inputs and labels.
        validation: Validation inputs and labels (early stopping on AUC, LR schedule).
        architecture: Keyword arguments of `TabularNet`.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Rows per optimiser step.
        pos_weight: Weight of a positive example in the loss (class imbalance).
        seed: Seeds initial weights, batch order and dropout.
        max_epochs: Upper bound on epochs.
        patience: Epochs without validation AUC gain before stopping.
        device: ``cpu`` or ``cuda[:N]``; on CUDA the forward pass runs under autocast.
        checkpoint_dir: Folder for the per-epoch checkpoint; None trains without one.
        on_epoch_end: Called with (epoch, validation AUC) after each epoch; may raise to stop
            (Optuna pruning).
        num_threads: Torch intra-op threads while training on the CPU, restored afterwards.
            Batches of a few hundred rows gain nothing from more threads, and lose a lot when
            other work shares the cores; a fixed count also keeps results identical anywhere.
    """
    with cpu_threads(device, num_threads):
        return _train(
            train,
            validation,
            architecture=architecture,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            batch_size=batch_size,
            pos_weight=pos_weight,
            seed=seed,
            max_epochs=max_epochs,
            patience=patience,
            device=device,
            checkpoint_dir=checkpoint_dir,
            on_epoch_end=on_epoch_end,
        )


@contextmanager
def cpu_threads(device: str, count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads when ``device`` is the CPU, then restore."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(
    train: NetArrays,
    validation: NetArrays,
    *,
    architecture: dict[str, Any],
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    pos_weight: float,
    seed: int,
    max_epochs: int,
    patience: int,
    device: str,
    checkpoint_dir: str | Path | None,
    on_epoch_end: Callable[[int, float], None] | None,
) -> NetworkFit:
    torch_device = torch.device(device)
    amp_dtype = mixed_precision_dtype(device)
    settings = {
        "architecture": architecture,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "pos_weight": pos_weight,
        "seed": seed,
        "max_epochs": max_epochs,
        "patience": patience,
        "device": torch_device.type,
    }

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    network = TabularNet(**architecture).to(torch_device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="max", factor=0.5, patience=max(1, patience // 2)
    )
    # A gradient scaler is only needed for float16; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(torch_device.type, enabled=amp_dtype == torch.float16)
    shuffle = torch.Generator().manual_seed(seed)
    loss_function = nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor(pos_weight, dtype=torch.float32, device=torch_device)
    )

    epoch = 0
    best_score = -math.inf
    best_epoch = 0
    stale_epochs = 0
    best_weights = {
        name: value.detach().cpu().clone() for name, value in network.state_dict().items()
    }
    history: list[dict[str, float]] = []
    resumed_from = 0

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    run_fingerprint = fingerprint((train, validation), settings) if checkpoint_path else ""
    if checkpoint_path is not None and checkpoint_path.exists():
        saved = read_checkpoint(checkpoint_path)
        if saved["fingerprint"] != run_fingerprint:
            raise CheckpointMismatchError(
                f"{checkpoint_path} was written by a fit with other data or settings; "
                "delete it to start over"
            )
        network.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        epoch = saved["epoch"]
        best_score = saved["best_score"]
        best_epoch = saved["best_epoch"]
        stale_epochs = saved["stale_epochs"]
        best_weights = saved["best_weights"]
        history = saved["history"]
        _restore_rng_states(saved["rng"], shuffle, device)
        resumed_from = epoch

    train_tensors = _to_device(train, torch_device)
    validation_tensors = _to_device(validation, torch_device)
    free, monotone, categories, labels = train_tensors
    rows = len(labels)

    while epoch < max_epochs and stale_epochs < patience:
        started = time.perf_counter()
        network.train()
        order = torch.randperm(rows, generator=shuffle).to(torch_device)
        total_loss = torch.zeros((), device=torch_device)
        for batch in order.split(batch_size):
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(
                device_type=torch_device.type, dtype=amp_dtype, enabled=amp_dtype is not None
            ):
                logits = network(free[batch], monotone[batch], categories[batch])
            loss = loss_function(logits.float(), labels[batch])
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            total_loss += loss.detach() * len(batch)
        score = _validation_auc(network, validation_tensors, amp_dtype)
        if math.isnan(score):
            raise FloatingPointError(
                f"the network diverged in epoch {epoch + 1} (non-finite scores); "
                "lower the learning rate"
            )
        scheduler.step(score)
        epoch += 1
        if score > best_score:
            best_score, best_epoch, stale_epochs = score, epoch, 0
            best_weights = {
                name: value.detach().cpu().clone() for name, value in network.state_dict().items()
            }
        else:
            stale_epochs += 1
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(total_loss) / rows,
                "validation_auc": score,
                "learning_rate": float(optimiser.param_groups[0]["lr"]),
                "seconds": time.perf_counter() - started,
            }
        )
        if checkpoint_path is not None:
            write_checkpoint(
                checkpoint_path,
                {
                    "fingerprint": run_fingerprint,
                    "epoch": epoch,
                    "model": network.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "stale_epochs": stale_epochs,
                    "best_weights": best_weights,
                    "history": history,
                    "rng": _rng_states(shuffle, device),
                },
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch, score)

    best_network = TabularNet(**architecture)
    best_network.load_state_dict(best_weights)
    return NetworkFit(
        network=best_network.eval(),
        best_score=best_score,
        best_epoch=best_epoch,
        epochs_run=epoch,
        resumed_from_epoch=resumed_from,
        epoch_seconds=[entry["seconds"] for entry in history[resumed_from:]],
        history=history,
        mixed_precision=str(amp_dtype).removeprefix("torch.") if amp_dtype else "none",
    )
