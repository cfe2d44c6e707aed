"""Engine settings the training loop cannot drive are refused up front, with what to use instead."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from dlqat.sharding import check_supported, gather_parameters


def fake_accelerator(distributed_type, fsdp_version=2, zero_stage=2):
    plugins = SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
        deepspeed_plugin=SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": zero_stage}}),
    )
    return SimpleNamespace(distributed_type=distributed_type, state=plugins)


@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_stages_other_than_1_and_2_are_refused(stage):
    with pytest.raises(NotImplementedError, match=f"zero_stage {stage} is not supported; use zero_stage 1 or 2"):
        check_supported(fake_accelerator(DistributedType.DEEPSPEED, zero_stage=stage))


def test_fsdp1_is_refused():
    with pytest.raises(NotImplementedError, match="fsdp_version 1 is not supported; set fsdp_version: 2"):
        check_supported(fake_accelerator(DistributedType.FSDP, fsdp_version=1))


@pytest.mark.parametrize(
    "kind, stage",
    [
        (DistributedType.NO, 0),
        (DistributedType.MULTI_CPU, 0),
        (DistributedType.FSDP, 0),
        (DistributedType.DEEPSPEED, 1),
    ],
)
def test_supported_engines_pass(kind, stage):
    check_supported(fake_accelerator(kind, zero_stage=stage))


def test_gather_parameters_copies_the_kept_ones():
    model = torch.nn.Linear(3, 2)
    state = gather_parameters(model, lambda name: name == "weight")
    assert list(state) == ["weight"] and torch.equal(state["weight"], model.weight)
    state["weight"].add_(1)  # a copy: the checkpoint does not alias the live parameter
    assert not torch.equal(state["weight"], model.weight)
