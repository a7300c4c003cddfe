"""Argument checks shared by the public ops: clear ValueError/TypeError naming the argument."""

from __future__ import annotations

from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_floating(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating tensor (float32, bfloat16, float16, float64), got {tensor.dtype}"
        )


def check_labels(name: str, labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {labels.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.device != first.device:
            raise ValueError(f"{name}: on device {tensor.device}, but {first_name} is on {first.device}")


def _values_unavailable(tensor: torch.Tensor) -> bool:
    """True where a tensor's values cannot be read: while torch.compile traces (a data-dependent
    branch would break the graph) and on the meta device (shapes only, e.g. a model initialised on
    meta). The data-dependent checks are skipped there; shapes and dtypes still propagate."""
    return torch.compiler.is_compiling() or tensor.device.type == "meta"


def check_label_range(name: str, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels must be ``ignore_index`` or in ``[0, vocab_size)``.

    One fused reduction and one host sync; the kernels never read out of bounds regardless. Skipped
    while torch.compile traces and on meta (:func:`_values_unavailable`): the kernels still reject
    such labels (CPU: ValueError; CUDA: NaN for that token).
    """
    if _values_unavailable(labels):
        return
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"{name}: value {value} is outside [0, {vocab_size}) and is not ignore_index ({ignore_index})"
        )


def check_pairs(name: str, rows: int) -> None:
    if rows % 2 != 0 or rows == 0:
        raise ValueError(
            f"{name}: a preference batch needs an even, non-zero number of rows "
            f"([chosen; rejected]), got {rows}"
        )


def check_nonempty_rows(
    name: str, counts: torch.Tensor, reason: str | Callable[[list[int]], str] | None = None
) -> None:
    """Every row needs at least one response token.

    ``reason`` says why an empty row is a problem for the caller (a string, or a function of the
    empty rows' indices, evaluated only when there are some); the default is the length-normalized
    mean's. Skipped while torch.compile traces and on meta (:func:`_values_unavailable`): the result
    is then NaN for such a row where it divides by the row's length.
    """
    if _values_unavailable(counts):
        return
    empty = counts == 0
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()[:8]
        if reason is None:
            why = "their length-normalized log-prob (a mean over no tokens) is undefined"
        else:
            why = reason(rows) if callable(reason) else reason
        raise ValueError(
            f"{name}: row(s) {rows} have no response tokens (every label is ignore_index after the "
            f"shift), so {why}"
        )


AUTOCAST_DEVICES = ("cpu", "cuda")
"""Devices whose autocast the fused linear ops follow (their autocast kernels)."""


def autocast_dtypes(device_type: str, *tensors: torch.Tensor | None) -> list[torch.dtype | None]:
    """The dtypes ``tensors`` have inside the op under the running autocast (as ``F.linear``'s
    operands: fp32/fp16/bf16 cast to the autocast dtype; fp64 and other dtypes left alone)."""
    enabled = device_type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)
    target = torch.get_autocast_dtype(device_type) if enabled else None
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return [
        None if t is None else (target if target is not None and t.dtype in castable else t.dtype)
        for t in tensors
    ]


def _autocast_note(hidden: torch.Tensor) -> str:
    if torch.is_autocast_enabled(hidden.device.type):
        return " (under torch.autocast: fp64 is not cast, as for F.linear)"
    return ""


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``hidden (..., T, D)``, ``weight (V, D)`` and optional ``bias (V,)``, same dtype and device."""
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected shape (..., T, D), got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        hint = ""
        if weight.dim() == 1 and weight.numel() == 0:
            hint = (
                " (an empty 1-D tensor is what a ZeRO-3 partitioned parameter looks like outside its "
                "module's forward: call the loss inside the module's forward or within "
                "deepspeed.zero.GatheredParameters, backward included)"
            )
        raise ValueError(f"weight: expected shape (V, D), got {tuple(weight.shape)}{hint}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: shape {tuple(weight.shape)} does not match hidden's last dimension "
            f"D={hidden.shape[-1]} (weight must be (V, D), the lm_head weight)"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary dimension V is empty")
    # Under torch.autocast the dtypes the op will see (its autocast kernel casts as F.linear does).
    h_dtype, w_dtype, b_dtype = autocast_dtypes(hidden.device.type, hidden, weight, bias)
    if w_dtype != h_dtype:
        raise TypeError(
            f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}{_autocast_note(hidden)}"
        )
    if bias is not None:
        check_floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) = (V,), got {tuple(bias.shape)}")
        if b_dtype != h_dtype:
            raise TypeError(
                f"bias: dtype {bias.dtype} differs from hidden's {hidden.dtype}{_autocast_note(hidden)}"
            )
    check_same_device(hidden=hidden, weight=weight, bias=bias)


def check_labels_match(name: str, labels: torch.Tensor, hidden: torch.Tensor) -> None:
    """``labels`` must have shape ``hidden.shape[:-1]``."""
    check_labels(name, labels)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{name}: shape {tuple(labels.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    check_same_device(hidden=hidden, **{name: labels})
