"""DL-QAT's phases: what trains, what stays frozen, and the ablation switches."""

import pytest
import torch

from conftest import tiny_model
from dlqat.methods.base import count_parameters, set_trainable
from dlqat.methods.dl_qat import DLQATConfig, phases, prepare


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_steps(model, phase, steps=2):
    set_trainable(model, phase.trains)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 300, (2, 16))
    grads = {}
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.update({n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    return grads


def kinds(names):
    return {n.rsplit(".", 1)[-1] for n in names}


@pytest.mark.parametrize("clip_mode,phase2_extra", [("learn_then_fix", set()), ("joint", {"scale", "offset"})])
def test_each_phase_trains_only_its_parameters(clip_mode, phase2_extra):
    model = tiny_model("llama")
    cfg = DLQATConfig(group_size=32, rank=4, clip_mode=clip_mode, phase1_steps=2, phase2_steps=2)
    prepare(model, cfg)
    schedule = phases(cfg)
    assert [p.name.split(":")[0] for p in schedule] == ["phase1", "phase2"]
    for phase, expected in zip(schedule, [{"scale", "offset"}, {"lora_a", "lora_b", "magnitude"} | phase2_extra]):
        before = snapshot(model)
        grads = run_steps(model, phase)
        after = snapshot(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert kinds(changed) == expected, phase.name
        assert all(grads[n] > 0 for n in changed)
        assert kinds(grads) == expected  # frozen parameters never even get a gradient


def test_ablation_switches():
    cfg = DLQATConfig(use_magnitude=False, clip_mode="dynamic", phase1_steps=5, phase2_steps=3)
    model = tiny_model("llama")
    prepare(model, cfg)
    assert not any(n.endswith(("magnitude", "scale", "offset")) for n, _ in model.named_parameters())
    (only,) = phases(cfg)
    assert only.steps == 3 and only.trains("x.lora_a") and not only.trains("x.magnitude")


def test_trainable_count_counts_tied_weights_once():
    model = tiny_model("llama")
    set_trainable(model, lambda n: False)
    trainable, total = count_parameters(model)
    assert trainable == 0 and total == sum(p.numel() for p in set(model.parameters()))


@pytest.mark.parametrize(
    "field,value",
    [
        ("n_bits", 1),
        ("group_size", 0),
        ("rank", 0),
        ("clip_mode", "sometimes"),
        ("phase1_steps", -1),
        ("lr", 0.0),
        ("alpha", -1.0),
    ],
)
def test_config_errors_name_field_and_value(field, value):
    with pytest.raises(ValueError, match=field) as err:
        DLQATConfig(**{field: value})
    assert repr(value) in str(err.value)
