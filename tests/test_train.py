"""The training loop on a tiny local Llama: the loss falls, a killed run resumes exactly, the CLI works."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_bench, tiny_args, tiny_configs, tiny_eval_args
from dlqat import loop
from dlqat.cli import main, parse_train_args
from dlqat.fileio import RefusedError
from dlqat.layers import QuantLoRALinear
from dlqat.loop import Checkpointer
from dlqat.methods import DLQATConfig, FullQATConfig, L4QConfig, QALoRAConfig, dl_qat
from dlqat.run_folder import check_same_run, load_checkpoint
from dlqat.schedules import lr_factor
from dlqat.train import train
from dlqat.train_config import TrainConfig, resolve_defaults


def test_training_lowers_loss_and_writes_the_run(tiny_model_dir, text_file, tmp_path):
    results = train(*tiny_configs(tiny_model_dir, text_file, tmp_path / "run"))
    ppl = results["perplexity"]
    assert ppl["dl_qat"] < 0.9 * ppl["rtn"], ppl
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 16))
    phase2 = [r["loss"] for r in log if r["phase"].startswith("phase2")]
    assert sum(phase2[-3:]) < sum(phase2[:3])
    for name in (
        "run_config.json",
        "results.json",
        "results.md",
        "quant_state.safetensors",
        "checkpoint.pt",
        "quantized/model.safetensors",
        "quantized/dlqat_quant.json",
    ):
        assert (tmp_path / "run" / name).is_file(), name
    assert "| dl_qat |" in (tmp_path / "run" / "results.md").read_text()


def test_training_that_hurts_the_start_is_reported(caplog):
    # (on the random tiny model any training lowers perplexity, so the check is on the rule itself)
    from dlqat.train import _warn_if_worse_than_start

    with caplog.at_level(logging.WARNING, logger="dlqat"):
        _warn_if_worse_than_start({"float": 9.0, "gptq-mse": 10.0, "dl_qat": 10.5}, "gptq-mse", "dl_qat")
    assert "worse than the untrained gptq-mse start (10.000 -> 10.500, +5.0%)" in caplog.text
    assert "ship the start itself (dlqat train --method gptq --grid mse ...)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dlqat"):
        _warn_if_worse_than_start({"rtn-mse": 10.0, "dl_qat": 10.5}, "rtn-mse", "dl_qat")  # no PTQ command for it
        _warn_if_worse_than_start({"rtn": 10.0, "dl_qat": 9.5}, "rtn", "dl_qat")  # better: nothing to say
        _warn_if_worse_than_start({"rtn": 10.0}, None, "rtn")  # a PTQ method has no start
    assert caplog.text.count("worse than the untrained") == 1 and "ship the start" not in caplog.text


class Killed(Exception):
    pass


@pytest.mark.parametrize("lr_schedule, warmup_steps", [("constant", 0), ("cosine", 3)])
def test_killed_run_resumes_to_the_same_result(
    lr_schedule, warmup_steps, tiny_model_dir, text_file, tmp_path, monkeypatch
):
    configs = lambda out, **more: tiny_configs(
        tiny_model_dir, text_file, out, lr_schedule=lr_schedule, warmup_steps=warmup_steps, **more
    )
    method_cfg, cfg = configs(tmp_path / "straight")
    train(method_cfg, cfg)
    log = [json.loads(line)["lr"] for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    phases = [(method_cfg.quant_lr, method_cfg.phase1_steps), (method_cfg.lr, method_cfg.phase2_steps)]
    expected = [lr * lr_factor(lr_schedule, i, n, warmup_steps) for lr, n in phases for i in range(n)]
    assert log == pytest.approx(expected, rel=1e-12)  # warmup (unit-tested in lr_factor) reaches the optimizer

    real_save = Checkpointer.save

    def save_then_die(self, model, optimizer, step, phase):
        real_save(self, model, optimizer, step, phase)
        if step == 8:  # inside phase 2, with optimizer state to restore
            raise Killed

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        train(*configs(tmp_path / "killed"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 8
    with pytest.raises(RefusedError, match="--resume"):
        train(*configs(tmp_path / "killed"))
    train(*configs(tmp_path / "killed", resume=True))
    straight = load_file(tmp_path / "straight" / "quant_state.safetensors")
    resumed = load_file(tmp_path / "killed" / "quant_state.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=0, rtol=0, msg=key)


def test_finished_run_resumed_with_a_longer_last_phase_equals_the_longer_run(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """Curves that span sessions: a finished 3+8-step run, resumed with --phase2_steps 12, ends exactly
    like a 3+12-step run (constant learning rate, data order fixed by seed and step); shrinking is refused.
    The grown run is planned with ``--lr_schedule auto``, which would decay a fresh 15-step run here: on
    resume auto keeps the run's own (constant) schedule instead of refusing the growth. The grown run's time per
    step is the whole run's (a clock that ticks 1 s per step in the first session, 3 s in the second), not the
    continuation's."""
    monkeypatch.setattr(dl_qat, "COSINE_FROM_STEPS", 12)
    configs = lambda out, **more: tiny_configs(tiny_model_dir, text_file, out, **more)
    train(*configs(tmp_path / "long", phase2_steps=12, lr_schedule="constant"))

    # loop.py reads the clock at the start and the end of each step: each step lasts 1 s, then 3 s
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=iter([0.0, 1.0] * 11).__next__))
    first = train(*configs(tmp_path / "grown", phase2_steps=8))
    assert first["seconds_per_step"] == 1.0
    assert json.loads((tmp_path / "grown" / "run_config.json").read_text())["train_config"]["lr_schedule"] == "constant"
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=iter([0.0, 3.0] * 4).__next__))
    grown_results = train(*configs(tmp_path / "grown", phase2_steps=12, resume=True))
    assert grown_results["seconds_per_step"] == pytest.approx((11 * 1.0 + 4 * 3.0) / 15)
    assert json.loads((tmp_path / "grown" / "run_config.json").read_text())["train_config"]["lr_schedule"] == "constant"
    long = load_file(tmp_path / "long" / "quant_state.safetensors")
    grown = load_file(tmp_path / "grown" / "quant_state.safetensors")
    for key in long:
        torch.testing.assert_close(grown[key], long[key], atol=0, rtol=0, msg=key)
    steps = [json.loads(line)["step"] for line in (tmp_path / "grown" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 16))
    with pytest.raises(ValueError, match="phase2_steps: 12 -> 10.*may grow"):
        train(*configs(tmp_path / "grown", phase2_steps=10, resume=True))


def test_cosine_schedule_decays_each_phase_and_may_not_grow(tiny_model_dir, text_file, tmp_path):
    """The logged lr of every step is the phase's lr times the cosine factor of its step within the phase;
    a decaying run refuses to grow its last phase on resume (its schedule was planned for the old length)."""
    method_cfg, cfg = tiny_configs(tiny_model_dir, text_file, tmp_path / "cos", lr_schedule="cosine")
    train(method_cfg, cfg)
    log = [json.loads(line) for line in (tmp_path / "cos" / "train_log.jsonl").read_text().splitlines()]
    phases = [(method_cfg.quant_lr, method_cfg.phase1_steps), (method_cfg.lr, method_cfg.phase2_steps)]
    expected = [lr * 0.5 * (1 + math.cos(math.pi * i / n)) for lr, n in phases for i in range(n)]
    assert [r["lr"] for r in log] == pytest.approx(expected, rel=1e-12)
    assert log[-1]["lr"] > 0 and log[0]["lr"] == method_cfg.quant_lr
    with pytest.raises(ValueError, match="phase2_steps: 12 -> 16 with lr_schedule='cosine'"):
        train(*tiny_configs(tiny_model_dir, text_file, tmp_path / "cos", lr_schedule="cosine", phase2_steps=16,
                            resume=True))  # fmt: skip


def test_auto_schedule_decays_dl_qat_from_its_measured_budget_only():
    """``--lr_schedule auto``: cosine for DL-QAT runs of COSINE_FROM_STEPS steps or more (both phases counted,
    a joint setting's too), constant below, for the other methods and for the paper preset; a resumed run
    keeps its own schedule; a schedule given explicitly is kept."""
    run = TrainConfig(model="m", data="d")
    schedule = lambda method, cfg=run, resumed=None: resolve_defaults(method, cfg, resumed)[1].lr_schedule
    at = dl_qat.COSINE_FROM_STEPS
    assert schedule(DLQATConfig(phase1_steps=8, phase2_steps=32)) == "constant"
    assert schedule(DLQATConfig(phase1_steps=8, phase2_steps=at - 9)) == "constant"
    assert schedule(DLQATConfig(phase1_steps=8, phase2_steps=at - 8)) == "cosine"
    assert schedule(DLQATConfig(clip_mode="joint", phase1_steps=0, phase2_steps=at)) == "cosine"
    assert schedule(DLQATConfig()) == "cosine"  # a full run's defaults: 1000 + 1000 steps
    assert schedule(DLQATConfig(), TrainConfig()) == "constant"  # the embedded demo: 10 + 30 steps
    assert schedule(DLQATConfig(), resumed="constant") == "constant"
    assert schedule(DLQATConfig(), replace(run, lr_schedule="linear")) == "linear"
    for method in (L4QConfig(steps=400), QALoRAConfig(steps=400), FullQATConfig(steps=400)):
        assert schedule(method) == "constant", method.name
    paper, paper_run = parse_train_args(["--preset", "paper", "--phase2_steps", "400", "--model", "m", "--data", "d"])
    assert schedule(paper, paper_run) == "constant"


def test_checkpoint_from_before_lr_schedule_resumes_as_constant():
    """A checkpoint written before ``lr_schedule`` existed ran at a constant lr: it resumes with that value
    (and may grow), and refuses another."""
    saved = {"method": "dl_qat", "method_config": {"phase2_steps": 8}, "train_config": {"seed": 1}}
    now = lambda schedule, steps=8: {
        "method": "dl_qat", "method_config": {"phase2_steps": steps},
        "train_config": {"seed": 1, "lr_schedule": schedule},
    }  # fmt: skip
    check_same_run(saved, now("constant", 12), Path("ckpt.pt"))
    with pytest.raises(ValueError, match="lr_schedule: 'constant' -> 'cosine'"):
        check_same_run(saved, now("cosine"), Path("ckpt.pt"))


@pytest.mark.parametrize(
    "flag,value",
    [("--weight_decay", "nan"), ("--max_grad_norm", "-1.0"), ("--kd_temperature", "inf"), ("--lr", "nan")]
    + [("--damp", v) for v in ("-0.01", "nan")],
)
def test_non_finite_or_negative_numbers_are_refused_before_any_work(flag, value):
    """A number that is NaN, inf or negative where it must not be is refused when the flags are read, naming
    the field and the value, not found as a NaN loss after the float evaluation and the start have run."""
    method = ["--method", "gptq"] if flag == "--damp" else []
    with pytest.raises(ValueError, match=f"{flag[2:]}={value}: expected a"):
        parse_train_args([*method, flag, value])


def test_lr_factor_schedules():
    assert [lr_factor("constant", i, 4) for i in range(4)] == [1.0] * 4
    assert [lr_factor("linear", i, 4) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor("cosine", 0, 4) == 1.0 and lr_factor("cosine", 2, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="step_in_phase=4"):
        lr_factor("cosine", 4, 4)
    # warmup: a linear ramp that never trains at 0, then the schedule over the remaining steps
    assert [lr_factor("constant", i, 6, 3) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_factor("linear", i, 6, 2) for i in range(6)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    assert [lr_factor("cosine", i, 4, 1) for i in range(4)] == pytest.approx([0.5, 1.0, 0.75, 0.25])
    assert [lr_factor("cosine", i, 2, 5) for i in range(2)] == [1 / 6, 2 / 6]  # warmup longer than the phase
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="lr_schedule='step'"):
        lr_factor("step", 0, 4)
    with pytest.raises(ValueError, match="lr_schedule='step'"):
        TrainConfig(lr_schedule="step")


def test_cli_train_then_eval_reproduces_the_reported_perplexity(tiny_model_dir, text_file, tmp_path, capsys):
    """The exported model is the trained one: with the post-rounding shift on (``--shift_lr``), folded into the
    stored offsets."""
    from safetensors.torch import load_file

    out = tmp_path / "cli"
    flags = {"n_bits": 4, "rank": 2, "phase1_steps": 1, "phase2_steps": 2, "eval_max_windows": 4, "shift_lr": 1e-3}
    rc = main(["train", *tiny_args(tiny_model_dir, text_file, out, **flags)])
    assert rc == 0 and "| dl_qat |" in capsys.readouterr().out
    shifts = [t for name, t in load_file(out / "quant_state.safetensors").items() if name.endswith(".shift")]
    assert shifts and all(t.abs().max() > 0 for t in shifts)  # trained, so the export has something to fold
    reported = json.loads((out / "results.json").read_text())["perplexity"]["dl_qat"]
    assert main(tiny_eval_args(out, text_file, tmp_path / "e.json", 4)) == 0
    assert json.loads((tmp_path / "e.json").read_text())["perplexity"]["perplexity"] == reported
    # RTN of the float model through `dlqat eval` equals the run's RTN row
    rtn_flags = ("--rtn-bits", "4", "--group-size", "32")
    assert main(tiny_eval_args(tiny_model_dir, text_file, tmp_path / "r.json", 4, *rtn_flags)) == 0
    rtn = json.loads((out / "results.json").read_text())["perplexity"]["rtn"]
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"]["perplexity"] == pytest.approx(rtn, rel=1e-6)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--n_bits", "9"], "n_bits=9"),
        (["train", "--clip_mode", "never"], "clip_mode='never'"),
        (["train", "--grad_accum", "0"], "grad_accum=0"),
        (["train", "--model", "/nonexistent/model.gguf"], "model='/nonexistent/model.gguf'"),
        (["eval", "/nonexistent/run", "--eval-data", "/nonexistent/x.txt", "--rtn-bits", "4"], "nonexistent"),
    ],
)
def test_cli_errors_name_the_field_and_value(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "dlqat", "train", "--help"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0 and "--group_size" in done.stdout


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, text_file, tmp_path, monkeypatch):
    recomputed = []
    real = QuantLoRALinear.forward
    monkeypatch.setattr(
        QuantLoRALinear, "forward", lambda self, x: recomputed.append(torch.is_grad_enabled()) or real(self, x)
    )
    train(*tiny_configs(tiny_model_dir, text_file, tmp_path / "plain", phase2_steps=3))
    plain_calls = len(recomputed)
    train(*tiny_configs(tiny_model_dir, text_file, tmp_path / "ckpt", phase2_steps=3, gradient_checkpointing=True))
    assert len(recomputed) - plain_calls > plain_calls  # the decoder layers ran again in backward
    plain, ckpt = (load_file(tmp_path / r / "quant_state.safetensors") for r in ("plain", "ckpt"))
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compile_gives_the_same_training(tiny_model_dir, text_file, tmp_path):
    """``--compile`` fuses the quantized layers' elementwise work in forward and backward: same run."""
    from dlqat.quant import lean_linear

    train(*tiny_configs(tiny_model_dir, text_file, tmp_path / "eager", phase2_steps=3))
    try:
        train(*tiny_configs(tiny_model_dir, text_file, tmp_path / "compiled", phase2_steps=3, compile=True))
    finally:
        lean_linear.set_compile(False)
    eager, compiled = (load_file(tmp_path / r / "quant_state.safetensors") for r in ("eager", "compiled"))
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-5, rtol=1e-4)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / r / "train_log.jsonl").read_text().splitlines()]
        for r in ("eager", "compiled")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_eval_at_writes_a_curve_on_every_text(tiny_model_dir, text_file, tmp_path):
    """One run's intermediate evaluations (the fake-quantized model at those steps) on each held-out text."""
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    method, cfg = tiny_configs(tiny_model_dir, text_file, tmp_path / "run", eval_at="2,5,15", curve_eval_data=str(other),
                               eval_max_windows=2)  # fmt: skip
    results = train(method, cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "curve.jsonl").read_text().splitlines()]
    assert [(r["step"], r["text"]) for r in rows] == [(s, t) for s in (2, 5, 15) for t in ("train.txt", "other.txt")]
    by_text = results["perplexity_by_text"]
    assert set(by_text) == {"train.txt", "other.txt"}
    assert set(by_text["other.txt"]) == {"float", "rtn-mse", "rtn", "dl_qat"}  # start (default init mse) + RTN row
    assert by_text["train.txt"]["dl_qat"] == results["perplexity"]["dl_qat"]
    # the last curve point is the trained model before conversion: the export computes the same
    assert rows[-1]["perplexity"] == pytest.approx(by_text["other.txt"]["dl_qat"], rel=1e-6)
    # bench/plot_curve.py draws the untrained start it names from the run's settings (default init: mse)
    plot_curve = load_bench("plot_curve")
    assert plot_curve.start_label(tmp_path / "run") == "rtn-mse"
    assert plot_curve.perplexities(tmp_path / "run", "rtn-mse") == {t: by_text[t]["rtn-mse"] for t in by_text}
    # a second seed with the same start shares one reference line; a different start gets its own
    shutil.copytree(tmp_path / "run", tmp_path / "seed2", ignore=shutil.ignore_patterns("checkpoint*", "quantized"))
    starts = {t: by_text[t]["rtn-mse"] for t in by_text}
    assert plot_curve.untrained_starts([tmp_path / "run", tmp_path / "seed2"]) == {"untrained (rtn-mse)": starts}
    results_file = tmp_path / "seed2" / "results.json"
    results_file.write_text(results_file.read_text().replace(str(by_text["other.txt"]["rtn-mse"]), "1.5"))
    assert set(plot_curve.untrained_starts([tmp_path / "run", tmp_path / "seed2"])) == {
        "run: untrained (rtn-mse)", "seed2: untrained (rtn-mse)"}  # fmt: skip
    # --labels names the lines (and the per-run start lines); a wrong count or a repeated name is refused
    runs = [tmp_path / "run", tmp_path / "seed2"]
    names = plot_curve.line_names(runs, "DL-QAT (cosine), seed 2")
    assert names == ["DL-QAT (cosine)", "seed 2"] and plot_curve.line_names(runs, None) == ["run", "seed2"]
    assert set(plot_curve.untrained_starts(runs, names)) == {
        "DL-QAT (cosine): untrained (rtn-mse)", "seed 2: untrained (rtn-mse)"}  # fmt: skip
    for bad in ("one", "a,a", "a,"):
        with pytest.raises(ValueError, match="2 distinct non-empty names"):
            plot_curve.line_names(runs, bad)
