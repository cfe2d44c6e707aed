"""DL-QAT's phases: what trains, what stays frozen, and the ablation switches."""

import pytest
import torch

from conftest import tiny_model
from dlqat import DLQATConfig, phases, prepare
from dlqat.methods.base import count_parameters, set_trainable


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


LORA_M = {"lora_a", "lora_b", "magnitude"}


@pytest.mark.parametrize(
    "clip_mode,phase1_steps,expected",
    [
        ("learn_then_fix", 2, [("phase1", {"scale", "offset"}), ("phase2", LORA_M)]),
        ("joint", 0, [("phase2", LORA_M | {"scale", "offset"})]),  # joint from step 1: no range-only phase
        ("learn_then_fix+shift", 2, [("phase1", {"scale", "offset"}), ("phase2", LORA_M | {"shift"})]),
    ],
)
def test_each_phase_trains_only_its_parameters(clip_mode, phase1_steps, expected):
    model = tiny_model("llama")
    clip_mode, _, shift = clip_mode.partition("+")
    cfg = DLQATConfig(
        group_size=32, rank=4, clip_mode=clip_mode, phase1_steps=phase1_steps, phase2_steps=2,
        shift_lr=1e-3 if shift else None,
    )  # fmt: skip
    prepare(model, cfg)
    schedule = phases(cfg)
    assert [p.name.split(":")[0] for p in schedule] == [name for name, _ in expected]
    for phase, (_, trained) in zip(schedule, expected):
        before = snapshot(model)
        grads = run_steps(model, phase)
        after = snapshot(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert kinds(changed) == trained, phase.name
        assert all(grads[n] > 0 for n in changed)
        assert kinds(grads) == trained  # frozen parameters never even get a gradient


def test_ablation_switches():
    cfg = DLQATConfig(use_magnitude=False, clip_mode="dynamic", phase1_steps=0, phase2_steps=3)
    model = tiny_model("llama")
    prepare(model, cfg)
    assert not any(n.endswith(("magnitude", "scale", "offset")) for n, _ in model.named_parameters())
    (only,) = phases(cfg)
    assert only.steps == 3 and only.trains("x.lora_a") and not only.trains("x.magnitude")


@pytest.mark.parametrize("clip_mode", ["dynamic", "joint"])
def test_phase1_steps_without_a_phase_1_is_refused(clip_mode):
    with pytest.raises(ValueError, match=f"phase1_steps=5: clip_mode={clip_mode} has no range-only phase 1"):
        DLQATConfig(clip_mode=clip_mode, phase1_steps=5)


def test_one_phase_settings_get_the_whole_budget():
    """Table 3's settings train equally long: without phase 1, phase 2 gets phase 1's steps too."""
    from dlqat.train_config import TrainConfig, resolve_defaults

    for clip_mode, expected in (("learn_then_fix", (1000, 1000)), ("dynamic", (0, 2000)), ("joint", (0, 2000))):
        cfg, _ = resolve_defaults(DLQATConfig(clip_mode=clip_mode), TrainConfig(model="m", data="d.txt"))
        assert (cfg.phase1_steps, cfg.phase2_steps) == expected


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
        ("magnitude_lr", 0.0),
        ("shift_lr", -1e-4),
        ("lr", float("nan")),  # passes a plain `<= 0` check, then turns every loss NaN
        ("quant_lr", float("inf")),
    ],
)
def test_config_errors_name_field_and_value(field, value):
    with pytest.raises(ValueError, match=field) as err:
        DLQATConfig(**{field: value})
    assert repr(value) in str(err.value)


@pytest.mark.parametrize("magnitude_lr,expected", [(None, 2e-3), (5e-3, 5e-3)])
def test_magnitude_lr_applies_to_m_alone(magnitude_lr, expected):
    """m gets its own phase-2 lr when given (else --lr) in the groups the optimizer is built from; A, B keep
    --lr. Without m to train the setting is refused, not ignored."""
    model = tiny_model("llama")
    cfg = DLQATConfig(group_size=32, rank=4, phase1_steps=0, phase2_steps=1, lr=2e-3, magnitude_lr=magnitude_lr)
    prepare(model, cfg)
    (phase,) = phases(cfg)
    set_trainable(model, phase.trains)
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in phase.param_groups(model) for p in g["params"]}
    assert lrs == {"lora_a": 2e-3, "lora_b": 2e-3, "magnitude": expected}
    with pytest.raises(ValueError, match="magnitude_lr=0.005: use_magnitude=False"):
        DLQATConfig(use_magnitude=False, magnitude_lr=5e-3)


def test_shift_lr_adds_a_zero_shift_per_group_with_its_own_lr():
    """``shift_lr`` switches the post-rounding shift on: zero at the start (the untrained layer is unchanged),
    trained in phase 2 at its own lr, never decayed; refused where the offset must stay -scale * z."""
    model = tiny_model("llama")
    cfg = DLQATConfig(group_size=32, rank=4, phase1_steps=0, phase2_steps=1, lr=2e-3, shift_lr=3e-4)
    names = prepare(model, cfg)
    layer = model.get_submodule(names[0])
    assert layer.shift.shape == layer.scale.shape and not layer.shift.any()
    (phase,) = phases(cfg)
    set_trainable(model, phase.trains)
    kind = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    groups = {kind[id(p)]: (g["lr"], g["weight_decay"]) for g in phase.param_groups(model, 0.1) for p in g["params"]}
    assert groups == {"lora_a": (2e-3, 0.1), "lora_b": (2e-3, 0.1), "magnitude": (2e-3, 0.0), "shift": (3e-4, 0.0)}
    with pytest.raises(ValueError, match="shift_lr=0.0003 with zero_point='int'"):
        DLQATConfig(shift_lr=3e-4, zero_point="int")
    plain = tiny_model("llama")
    prepare(plain, DLQATConfig(group_size=32, rank=4))
    assert not any(n.endswith("shift") for n, _ in plain.named_parameters())  # off unless asked for


def test_weight_decay_never_touches_the_quantizer_parameters():
    """AdamW decay on m would pull the magnitude toward 0, on scale/offset the range toward a point."""
    model = tiny_model("llama")
    cfg = DLQATConfig(group_size=32, rank=4, clip_mode="joint", phase1_steps=0, phase2_steps=1)
    prepare(model, cfg)
    (phase,) = phases(cfg)
    set_trainable(model, phase.trains)
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in phase.param_groups(model, 0.1) for p in g["params"]}
    assert decay == {"lora_a": 0.1, "lora_b": 0.1, "magnitude": 0.0, "scale": 0.0, "offset": 0.0}
