"""Your model, your data, your loss: how prunelab calls a model on a batch (DESIGN, Round 2).

Everything that runs a model goes through three small contracts:

* **Inputs** (:func:`call`): in a batch ``(x, y)``, ``x`` is a tensor (``model(x)``), a mapping
  of tensors (``model(**x)``: ``input_ids``, ``attention_mask`` ...) or a tuple (``model(*x)``).
* **Outputs** (:func:`output_tensor`): a tensor; a tuple or list (its first element); a mapping
  or an object with ``logits`` (HuggingFace ``ModelOutput``). ``output=`` (a callable
  ``output -> tensor``) adapts anything else.
* **Loss** (:class:`Objective`): ``"cross_entropy"`` (logits ``(N, C)`` with class indices
  ``(N,)`` or probabilities ``(N, C)``, or per-token ``(N, T, C)`` with ``(N, T)`` and
  ``ignore_index=-100``), ``"mse"`` (mean over all elements, as ``F.mse_loss``) or a callable
  ``(output, target) -> mean loss``.

Data (:func:`as_batch`): ``(x, y)`` tensors, a torch ``Dataset`` or a ``DataLoader`` (read up to
the examples asked for; mappings yielded with a ``labels``/``label``/``target``/``y`` entry are
split into inputs and targets). Device and dtype follow the model's parameters (:func:`to_model`):
floating inputs take the model's dtype, integer ones (token ids, labels) keep theirs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Objective", "objective", "LOSSES", "TARGET_KEYS", "IGNORE_INDEX", "call",
           "output_tensor", "as_batch", "length", "take", "to_model", "model_device_dtype",
           "chunks", "check_inputs", "evaluating", "probe", "map_tensors", "shapes", "call_named", "tensors_in"]


def __dir__():
    return sorted(__all__)


LOSSES = ("cross_entropy", "mse")
IGNORE_INDEX = -100
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


# ----------------------------------------------------------------------------- inputs
def call(model: nn.Module, x):
    """``model(x)``, ``model(**x)`` for a mapping, ``model(*x)`` for a tuple or list."""
    if isinstance(x, Tensor):
        return model(x)
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    raise TypeError(f"model inputs must be a tensor, a mapping of tensors (model(**x)) or a tuple "
                    f"(model(*x)), got {type(x).__name__}")


def length(x) -> int:
    """Number of examples in inputs ``x`` (the first dimension of its tensors)."""
    if isinstance(x, Tensor):
        return len(x) if x.dim() else 1
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor):
                return length(v)
        raise TypeError(f"input mapping holds no tensor: keys {sorted(x)}")
    if isinstance(x, (tuple, list)):
        for v in x:
            if isinstance(v, Tensor):
                return length(v)
        raise TypeError("input tuple holds no tensor")
    raise TypeError(f"inputs must be a tensor, a mapping of tensors or a tuple, got "
                    f"{type(x).__name__}")


def take(x, index):
    """Rows ``index`` (a slice or index tensor) of every tensor in ``x``."""
    if isinstance(x, Tensor):
        return x[index]
    if isinstance(x, Mapping):
        return {k: (v[index] if isinstance(v, Tensor) else v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(v[index] if isinstance(v, Tensor) else v for v in x)
    raise TypeError(f"cannot index inputs of type {type(x).__name__}")


def map_tensors(x, fn):
    """``x`` with ``fn`` applied to every tensor in it (tensor, mapping, tuple or list)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(v, fn) for v in x)
    return x


def tensors_in(x) -> Iterator[Tensor]:
    """Every tensor in ``x``: a tensor, a mapping, a tuple or list, or a dict-like model output
    (HuggingFace ``ModelOutput``), nested."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from tensors_in(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from tensors_in(v)
    elif hasattr(x, "__dict__") and hasattr(x, "keys"):
        for k in x.keys():
            yield from tensors_in(x[k])


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters (else buffers; else CPU float32)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in (*model.parameters(), *model.buffers()):
        return t.device, torch.get_default_dtype()
    return torch.device("cpu"), torch.get_default_dtype()


def to_model(x, model: nn.Module | None = None, *, device=None, dtype=None):
    """``x`` on the model's device; floating tensors in its dtype, integer ones unchanged."""
    if model is not None:
        device, dtype = model_device_dtype(model)

    def move(t: Tensor) -> Tensor:
        if t.is_floating_point() and dtype is not None and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t.to(device) if device is not None and t.device != device else t
    return map_tensors(x, move)


def check_inputs(x, what: str = "batch inputs") -> None:
    """Floating inputs must be finite; ValueError naming ``what`` otherwise."""
    for t in tensors_in(x):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what} contain NaN or inf")


# ----------------------------------------------------------------------------- outputs
def output_tensor(out, output: Callable | None = None) -> Tensor:
    """The tensor a loss is computed on, from whatever the model returned.

    A tensor as it is; a tuple or list: its first element; a mapping or an object with a
    ``logits`` entry or attribute (HuggingFace ``ModelOutput``): that. ``output`` (a callable
    ``output -> tensor``) overrides the rule.
    """
    if output is not None:
        z = output(out)
        if not isinstance(z, Tensor):
            raise TypeError(f"output= returned {type(z).__name__}, expected a tensor")
        return z
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    keys = f" with keys {sorted(out)}" if isinstance(out, Mapping) else ""
    raise TypeError(f"the model returned {type(out).__name__}{keys}, which is not a tensor, a "
                    f"tuple or a mapping/object with 'logits'; pass output= a callable "
                    f"output -> tensor (e.g. output=lambda o: o['scores'])")


# ----------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class Objective:
    """How a model's output becomes a loss: the output rule and the loss.

    Attributes:
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``(output, target) -> mean loss``.
        output: optional callable ``model output -> tensor`` (see :func:`output_tensor`).
        ignore_index: target value ignored by per-token cross-entropy.
    """

    loss: str | Callable = "cross_entropy"
    output: Callable | None = None
    ignore_index: int = IGNORE_INDEX

    @property
    def name(self) -> str:
        return self.loss if isinstance(self.loss, str) else "callable"

    @property
    def classifies(self) -> bool:
        """True when accuracy is defined (cross-entropy over classes)."""
        return self.loss == "cross_entropy"

    def forward(self, model: nn.Module, x) -> Tensor:
        """The output tensor of ``model`` on inputs ``x``."""
        return output_tensor(call(model, x), self.output)

    def first_forward(self, model: nn.Module, x, what: str = "data", shown=None) -> Tensor:
        """:meth:`forward` for the first chunk of a loop: an input the model cannot take (a
        wrong width, integer inputs) becomes a ValueError naming the input shapes; an
        ``output=`` that fails on what the model returned, a TypeError. ``shown``: the inputs
        whose shapes the message names (default ``x``)."""
        return self._output(call_named(model, x, what, shown), what)

    def _output(self, out, what: str) -> Tensor:
        try:
            return output_tensor(out, self.output)
        except (KeyError, IndexError, AttributeError) as err:
            raise TypeError(f"{what}: output= failed on the model's output "
                            f"({type(out).__name__}): {err!r}") from err

    def check(self, z: Tensor, y: Tensor) -> None:
        """ValueError/TypeError when targets ``y`` do not fit outputs ``z`` under this loss."""
        if len(z) != len(y):
            raise ValueError(f"the model returned {len(z)} outputs for {len(y)} targets")
        if self.loss == "cross_entropy":
            if z.dim() < 2 or z.shape[-1] < 2:
                raise ValueError(f"loss='cross_entropy' needs logits of shape (N, C >= 2) or "
                                 f"(N, T, C), the model returned {tuple(z.shape)}; for "
                                 f"regression pass loss='mse'")
            c = z.shape[-1]
            if y.is_floating_point():
                if y.shape != z.shape:
                    raise TypeError(f"float targets for cross_entropy must be class "
                                    f"probabilities shaped like the logits {tuple(z.shape)}, got "
                                    f"{tuple(y.shape)} (class indices must be integers; for "
                                    f"regression pass loss='mse')")
                if y.numel() and float(y.min()) < 0:
                    raise ValueError(f"float targets for cross_entropy are class probabilities "
                                     f"and must be >= 0, got a minimum of {float(y.min()):.4g}; "
                                     f"for regression targets pass loss='mse'")
                return
            if y.dtype == torch.bool or y.is_complex():
                raise TypeError(f"cross_entropy targets must be integer class indices, got {y.dtype}")
            if tuple(y.shape) != tuple(z.shape[:-1]):
                raise ValueError(f"cross_entropy targets must have shape {tuple(z.shape[:-1])} "
                                 f"for logits {tuple(z.shape)}, got {tuple(y.shape)}")
            valid = y != self.ignore_index
            if z.dim() == 2 and not bool(valid.all()):
                raise ValueError(f"labels hold {self.ignore_index} (ignore_index), which only "
                                 f"per-token (N, T, C) outputs may use")
            if valid.any():
                lo, hi = int(y[valid].min()), int(y[valid].max())
                if lo < 0 or hi >= c:
                    raise ValueError(f"labels must lie in [0, {c}) for a model with {c} outputs, "
                                     f"got labels in [{lo}, {hi}]")
            else:
                raise ValueError(f"every target equals ignore_index {self.ignore_index}: "
                                 f"there is nothing to measure")
        elif self.loss == "mse":
            if not y.is_floating_point():
                raise TypeError(f"loss='mse' needs floating targets, got {y.dtype}")
            if y.shape != z.shape:
                raise ValueError(f"loss='mse' needs targets shaped like the outputs "
                                 f"{tuple(z.shape)}, got {tuple(y.shape)}")

    def value(self, z: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """The loss of outputs ``z`` against targets ``y``: mean, or ``"sum"`` over the units
        the mean divides by (examples, or non-ignored tokens for per-token cross-entropy)."""
        if self.loss == "cross_entropy":
            if z.dim() > 2:
                return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1, *y.shape[2:]),
                                       ignore_index=self.ignore_index, reduction=reduction)
            return F.cross_entropy(z, y, reduction=reduction)
        if self.loss == "mse":
            per = (z - y).square().reshape(len(z), -1).mean(1)
            return per.mean() if reduction == "mean" else per.sum()
        out = self.loss(z, y)
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the loss callable must return a scalar tensor (the mean loss), "
                             f"got {shape}")
        return out * self.units(z, y) if reduction == "sum" else out

    def units(self, z: Tensor, y: Tensor) -> int:
        """What the mean divides by: examples, or the non-ignored tokens of per-token CE."""
        if self.loss == "cross_entropy" and z.dim() > 2 and not y.is_floating_point():
            return int(torch.count_nonzero(y != self.ignore_index))
        return len(z)

    def correct(self, z: Tensor, y: Tensor) -> tuple[int, int]:
        """(correct predictions, counted units) for classification; (0, 0) otherwise."""
        if not self.classifies:
            return 0, 0
        if y.is_floating_point():
            y = y.argmax(-1)
        valid = y != self.ignore_index
        hit = (z.argmax(-1) == y) & valid
        return int(torch.count_nonzero(hit)), int(torch.count_nonzero(valid))


def objective(loss="cross_entropy", output: Callable | None = None) -> Objective:
    """An :class:`Objective` from ``loss=`` and ``output=``, validated (an Objective passes)."""
    if isinstance(loss, Objective):
        if output is not None:
            return Objective(loss.loss, output, loss.ignore_index)
        return loss
    if loss is None:
        loss = "cross_entropy"
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES} or a callable (output, target) -> "
                             f"mean loss, got {loss!r}")
    elif not callable(loss):
        raise TypeError(f"loss must be one of {LOSSES} or a callable, got {type(loss).__name__}")
    if output is not None and not callable(output):
        raise TypeError(f"output must be a callable model output -> tensor, got "
                        f"{type(output).__name__}")
    return Objective(loss, output)


# ----------------------------------------------------------------------------- data
def _split_mapping(item: Mapping, what: str):
    for k in TARGET_KEYS:
        if k in item:
            return {key: v for key, v in item.items() if key != k}, item[k]
    raise ValueError(f"{what} yielded a mapping with keys {sorted(item)} and no targets: expected "
                     f"one of {TARGET_KEYS} (or (x, y) pairs)")


def _pair(item, what: str):
    if isinstance(item, Mapping):
        return _split_mapping(item, what)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise ValueError(f"{what} must yield (x, y) pairs or mappings with a 'labels' entry, got "
                     f"{type(item).__name__}" + (f" of length {len(item)}"
                                                 if isinstance(item, (tuple, list)) else ""))


def _pad_value(key, t: Tensor):
    if key in TARGET_KEYS:
        return IGNORE_INDEX if not t.is_floating_point() else 0.0
    return 0


def _cat(parts: list, key=None):
    """Concatenate along examples; sequences of different lengths are right-padded (token ids
    and masks with 0, integer targets with ignore_index -100)."""
    first = parts[0]
    if isinstance(first, Tensor):
        if first.dim() >= 2 and len({p.shape[1:] for p in parts}) > 1 and all(
                p.dim() == first.dim() and p.shape[2:] == first.shape[2:] for p in parts):
            width = max(p.shape[1] for p in parts)
            parts = [F.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1]),
                           value=_pad_value(key, p)) for p in parts]
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: _cat([p[k] for p in parts], k) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    return torch.as_tensor(parts)


def as_batch(data, n: int | None = None, *, what: str = "data"):
    """``(x, y)`` from ``(x, y)`` tensors, a torch ``Dataset`` or a ``DataLoader``.

    Args:
        data: a pair (``x`` a tensor, mapping or tuple; ``y`` a tensor), a map-style Dataset (items
            ``(x, y)`` or mappings with a ``labels`` entry), or a DataLoader (iterated until ``n``
            examples are read).
        n: read at most this many examples (None: all).
        what: the argument's name in error messages.

    Raises:
        TypeError / ValueError naming ``what`` and what was found.
    """
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (int, float)):
        x, y = data
        if not isinstance(y, Tensor):
            raise TypeError(f"{what}: targets y must be a tensor, got {type(y).__name__}")
        length(x)  # validates the inputs' type
    elif isinstance(data, Mapping):
        x, y = _split_mapping(data, what)
    elif isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise ValueError(f"{what}: a TensorDataset of (x, y) is expected, got "
                             f"{len(data.tensors)} tensors")
        x, y = data.tensors
    elif isinstance(data, DataLoader):
        xs, ys, seen = [], [], 0
        for item in data:
            xb, yb = _pair(item, what)
            xs.append(xb)
            ys.append(torch.as_tensor(yb))
            seen += len(ys[-1])
            if n is not None and seen >= n:
                break
        if not xs:
            raise ValueError(f"{what}: the DataLoader yielded no batch")
        x, y = _cat(xs), _cat(ys, "labels")
    elif isinstance(data, Dataset):
        from torch.utils.data import default_collate

        try:
            size = len(data)
        except TypeError as err:
            raise TypeError(f"{what}: an iterable Dataset needs a DataLoader around it") from err
        items = [_pair(data[i], what) for i in range(size if n is None else min(n, size))]
        if not items:
            raise ValueError(f"{what}: the Dataset is empty")
        x = default_collate([a for a, _ in items])
        y = default_collate([b for _, b in items])
        y = torch.as_tensor(y)
    else:
        raise TypeError(f"{what} must be (x, y) tensors, a torch Dataset or a DataLoader, got "
                        f"{type(data).__name__}")
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
    m = length(x)
    if m != len(y):
        raise ValueError(f"{what}: inputs and targets must have the same length, got {m} and "
                         f"{len(y)}")
    if m == 0:
        raise ValueError(f"{what} is empty (0 examples)")
    if n is not None and m > n:
        x, y = take(x, slice(0, n)), y[:n]
    return x, y


def chunks(x, y, size: int) -> Iterator[tuple[object, Tensor]]:
    """``(x, y)`` in consecutive pieces of at most ``size`` examples."""
    m = len(y)
    for i in range(0, m, size):
        sl = slice(i, min(i + size, m))
        yield take(x, sl), y[sl]


def shapes(x):
    """The shapes of the tensors in inputs ``x`` (for messages)."""
    if isinstance(x, Tensor):
        return tuple(x.shape)
    if isinstance(x, Mapping):
        return {k: tuple(v.shape) for k, v in x.items() if isinstance(v, Tensor)}
    return [tuple(v.shape) for v in tensors_in(x)]


def probe(model: nn.Module, x, y: Tensor, objective: Objective, what: str = "the model") -> None:
    """Run the first example through ``model`` (eval mode, no grad) and check every target
    against its output under ``objective``: a model that cannot take the inputs gives a
    ValueError naming the input shapes; ill-fitting targets the objective's errors."""
    with evaluating(model), torch.no_grad():
        z = objective.first_forward(model, take(x, slice(0, 1)), what, shown=x)
    objective.check(z.expand(len(y), *z.shape[1:]), y)


def call_named(model: nn.Module, x, what: str = "data", shown=None):
    """:func:`call`, with an input the model cannot take (a wrong width, integer inputs)
    raised as a ValueError naming ``what`` and the shapes of ``shown`` (default ``x``)."""
    try:
        return call(model, x)
    except (RuntimeError, IndexError) as err:
        raise ValueError(f"{what}: the model cannot run on these inputs (shapes "
                         f"{shapes(x if shown is None else shown)}): "
                         f"{str(err).splitlines()[0]}") from err


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode for the call; every module's OWN training flag restored afterwards (a
    BatchNorm or Dropout the caller put in eval stays in eval; ``model.train(was)`` would not)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
