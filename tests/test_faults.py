"""Scale-out and faults: 2-process DDP equals one process, kill -9 then --resume, NaN stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_configs
from dlqat.layers import QuantLoRALinear
from dlqat.train import train


def common(model, data, phase2_steps=4):
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--eval_data",
        str(data),
        "--group_size",
        "32",
        "--rank",
        "4",
        "--phase1_steps",
        "2",
        "--phase2_steps",
        str(phase2_steps),
        "--lr",
        "1e-2",
        "--quant_lr",
        "1e-3",
        "--seq_len",
        "32",
        "--eval_seq_len",
        "32",
        "--eval_max_windows",
        "2",
        "--no_progress",
        "--grad_accum",
        "2",
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_ddp_two_processes_match_one_process(tiny_model_dir, text_file, tmp_path):
    args = common(tiny_model_dir, text_file)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dlqat",
            "train",
            *args,
            "--output_dir",
            str(tmp_path / "one"),
            "--micro_batch_size",
            "2",
        ],
        check=True,
        env=ENV,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29561",
            "-m",
            "dlqat",
            "train",
            *args,
            "--output_dir",
            str(tmp_path / "ddp"),
            "--micro_batch_size",
            "1",
        ],
        check=True,
        env=ENV,
        capture_output=True,
    )
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one, ddp = (load_file(tmp_path / r / "quant_state.safetensors") for r in ("one", "ddp"))
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], atol=1e-5, rtol=1e-4)


def test_kill_9_then_resume_ends_like_an_uninterrupted_run(tiny_model_dir, text_file, tmp_path):
    args = common(tiny_model_dir, text_file, phase2_steps=60) + ["--save_every", "3"]
    subprocess.run(
        [sys.executable, "-m", "dlqat", "train", *args, "--output_dir", str(tmp_path / "straight")],
        check=True,
        env=ENV,
        capture_output=True,
    )
    run = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-m", "dlqat", "train", *args, "--output_dir", str(run)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").is_file():
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert 3 <= killed_at < 62 and not (run / "results.json").exists()
    subprocess.run(
        [sys.executable, "-m", "dlqat", "train", *args, "--output_dir", str(run), "--resume"],
        check=True,
        env=ENV,
        capture_output=True,
    )
    straight, resumed = (load_file(tmp_path / r / "quant_state.safetensors") for r in ("straight", "killed"))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=0, rtol=0)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_model_dir, text_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_forward = QuantLoRALinear.forward

    def poisoned(self, x):
        calls["n"] += 1
        y = real_forward(self, x)
        return y * float("nan") if calls["n"] > 14 * 2 * 5 else y  # 14 layers: after the RTN eval and 4 steps

    monkeypatch.setattr(QuantLoRALinear, "forward", poisoned)
    method, cfg = tiny_configs(
        tiny_model_dir, text_file, tmp_path / "nan", n_bits=4, rank=4, phase1_steps=2, phase2_steps=6, lr=2e-4,
        quant_lr=1e-4, micro_batch_size=1, eval_max_windows=2, save_every=2,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"loss became nan at step \d+ .*checkpoint.pt"):
        train(method, cfg)
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["quant_state"].values())
