"""How a method plugs in: a ``QuantMethod`` handler registered for its config class.

As torchao's ``register_quantize_module_handler``: the config *is* the handle. ``dlqat.prepare(model,
DLQATConfig(...))`` looks up the handler of the config's class (or of a base class), so adding a
method means writing a config dataclass and a handler, and decorating the handler:

    @register_method(MyConfig)
    class MyMethod(QuantMethod):
        def prepare(self, model, cfg): ...          # swap layers in, return their names
        def phases(self, cfg, layer_names): ...     # what trains, how long, at which learning rate

``calibrate`` (a data-dependent start, e.g. from GPTQ; with ``calibrated_state`` and ``load_calibrated``
where it can be cached), ``finalize`` (post-training steps such as GPTQ),
``default_loss`` and ``default_lr_schedule`` (what ``--loss auto`` and ``--lr_schedule auto`` mean),
``starts_at`` (which named PTQ result the prepared, untrained model equals, evaluated as a reference row),
``float_teacher`` (whether the layers keep the float weight to distil from) and ``trains_final_forward``
(whether a mid-run evaluation is the low-bit model's) have defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from dlqat.methods.base import Phase, QuantMethodConfig


class QuantMethod:
    """A method's lifecycle steps. Subclass, implement ``prepare`` (and ``phases`` if it trains), register."""

    def prepare(self, model: nn.Module, cfg: QuantMethodConfig) -> list[str]:
        """Swap the method's layers into ``model`` in place; returns the replaced layers' dotted names."""
        raise NotImplementedError

    def phases(self, cfg: QuantMethodConfig, layer_names: list[str]) -> list[Phase]:
        """The training schedule (empty for post-training methods)."""
        return []

    def calibrate(
        self, model: nn.Module, cfg: QuantMethodConfig, layer_names: list[str], calibration: Sequence[torch.Tensor]
    ) -> None:
        """Data-dependent start after ``prepare`` (e.g. GPTQ's codes and ranges); default: none."""

    def calibrated_state(
        self, model: nn.Module, cfg: QuantMethodConfig, layer_names: list[str]
    ) -> dict[str, torch.Tensor]:
        """The tensors ``calibrate`` writes, by state-dict name (the model's own tensors, not copies), so that a
        run can cache a calibrated start (``--start_cache``); empty where ``calibrate`` writes nothing."""
        return {}

    def load_calibrated(
        self, model: nn.Module, cfg: QuantMethodConfig, layer_names: list[str], state: dict[str, torch.Tensor]
    ) -> None:
        """Instead of ``calibrate``: put a cached ``calibrated_state`` (same names, shapes, dtypes) in place."""
        raise NotImplementedError(f"{type(self).__name__} writes no calibrated state to load")

    def finalize(
        self, model: nn.Module, cfg: QuantMethodConfig, layer_names: list[str], calibration: Sequence[torch.Tensor]
    ) -> None:
        """Post-training work on the trained model (e.g. GPTQ on calibration batches); default: none."""

    def default_loss(self, cfg: QuantMethodConfig) -> str:
        """The loss ``--loss auto`` means for this method (``kd`` where distilling from the float model
        helps; ``ce`` where there is no float teacher in the model or the student starts equal to it)."""
        return "ce"

    def default_lr_schedule(self, cfg: QuantMethodConfig) -> str:
        """The schedule ``--lr_schedule auto`` means for ``cfg`` (its step counts filled): constant, the
        published methods' own, unless a method has measured better."""
        return "constant"

    def float_teacher(self, cfg: QuantMethodConfig) -> bool:
        """Whether the prepared layers keep the frozen float weight, so that switching their quantizers
        and adapters off gives the float model (the no-copy distillation teacher)."""
        return True

    def starts_at(self, cfg: QuantMethodConfig) -> str | None:
        """The named PTQ result the prepared, untrained model computes exactly (``"rtn"``), or None."""
        return "rtn"

    def trains_final_forward(self, cfg: QuantMethodConfig) -> bool:
        """Whether the model being trained computes what the finished model will, so that evaluating it
        mid-run (``--eval_at``) gives a shorter run's result; false where ``finalize`` still quantizes."""
        return True


_HANDLERS: dict[type, QuantMethod] = {}
H = TypeVar("H", bound=type)


def register_method(config_cls: type):
    """Class decorator: make ``handler_cls()`` the handler of ``config_cls`` (and of its subclasses
    without a handler of their own). ``config_cls.name`` is the method's CLI name."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, QuantMethodConfig)):
        raise TypeError(f"register_method({config_cls!r}): expected a QuantMethodConfig subclass")

    def wrap(handler_cls: H) -> H:
        taken = {cls.name: cls for cls in _HANDLERS if cls is not config_cls}
        if config_cls.name in taken:
            raise ValueError(f"method name {config_cls.name!r} is taken by {taken[config_cls.name].__name__}")
        _HANDLERS[config_cls] = handler_cls()
        return handler_cls

    return wrap


def handler(cfg: QuantMethodConfig) -> QuantMethod:
    """The handler registered for ``cfg``'s class (or its nearest registered base class)."""
    for cls in type(cfg).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise TypeError(
        f"{type(cfg).__name__} has no registered method: decorate a QuantMethod with @register_method"
        f"({type(cfg).__name__}), or pass one of {', '.join(sorted(method_names()))}"
    )


def method_configs() -> dict[str, type]:
    """CLI name -> config class, for every registered method."""
    return {cls.name: cls for cls in _HANDLERS}


def method_names() -> list[str]:
    return sorted(method_configs())


def config_class(name: str) -> type:
    configs = method_configs()
    if name not in configs:
        raise ValueError(f"method={name!r}: expected one of {sorted(configs)}")
    return configs[name]
