"""Scale-out and faults: 2-process DDP, FSDP2 and ZeRO equal one process, kill -9 then --resume, NaN stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_configs
from dlqat.layers import QuantLoRALinear
from dlqat.train import train


def common(model, data, phase2_steps=4, loss="kd"):
    # kd at 2 bits: the student is far enough from its float teacher that the gradients stand well above
    # float noise (at 4 bits the tiny model's KL starts near 0 and Adam would amplify rounding noise)
    bits = ["--n_bits", "2", "--clip_mode", "learn_then_fix"] if loss == "kd" else []  # the settings tuned on
    return [
        *bits,
        "--init",
        "minmax",  # the engine tests compare float summation orders; pin the start they were tuned on
        "--loss",
        loss,
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
        "--max_grad_norm",
        "0.5",  # below these gradients' norms: each engine must clip as one process does
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


# Each engine as `accelerate launch` would start it: torchrun's program and the environment it sets.
# FSDP goes through tests/fsdp_on_cpu.py (Accelerate makes FSDP only on accelerators; see there).
ENGINES = {
    "ddp": (["-m", "dlqat"], ENV),
    "fsdp2": (
        [str(Path(__file__).with_name("fsdp_on_cpu.py"))],
        {**ENV, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
    ),
    "zero1": (["-m", "dlqat"], {**ENV, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}),
    "zero2": (["-m", "dlqat"], {**ENV, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
}


def run_two_processes(engine: str, *args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """``dlqat train *args`` on 2 CPU processes under ``engine``; with ``popen`` returns the running launcher."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    program, env = ENGINES[engine]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *program,
        "train",
    ]
    if popen:
        return subprocess.Popen([*command, *args], env=env, **popen)
    done = run_with_deadline([*command, *args], env)
    # Show the launcher's own output on failure: check=True alone hides why a rank exited.
    assert done.returncode == 0, f"{engine} run exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


def run_with_deadline(command: list[str], env: dict, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run the launcher in its own process group; past ``timeout_s`` kill the group and fail.

    A rank that hangs (say, on a build lock) must fail this test, not stall the suite: killing only
    torchrun would leave its workers running.
    """
    child = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        pytest.fail(f"{' '.join(command[-12:])} still running after {timeout_s:.0f} s:\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def one_process_runs(tiny_model_dir, text_file, tmp_path_factory):
    """loss -> a one-process reference run (made on first use)."""
    runs = {}

    def get(loss: str):
        if loss not in runs:
            out = tmp_path_factory.mktemp(f"one-{loss}")
            args = common(tiny_model_dir, text_file, loss=loss) + ["--output_dir", str(out), "--micro_batch_size", "2"]
            subprocess.run([sys.executable, "-m", "dlqat", "train", *args], check=True, env=ENV, capture_output=True)
            runs[loss] = out
        return runs[loss]

    return get


# kd (the default loss of dl_qat) under every engine: the teacher pass runs through each wrapper too
@pytest.mark.parametrize("engine,loss", [("ddp", "ce"), *((engine, "kd") for engine in ENGINES)])
def test_two_processes_match_one_process(engine, loss, one_process_runs, tiny_model_dir, text_file, tmp_path):
    """Same global batch (2 x 1 example vs 1 x 2): same losses, same trained tensors, same perplexity."""
    one_process_run = one_process_runs(loss)
    run_two_processes(
        engine, *common(tiny_model_dir, text_file, loss=loss), "--output_dir", str(tmp_path), "--micro_batch_size", "1"
    )
    # a KL of ~0.002 is the difference of O(1) fp32 terms: its rounding error is ~1e-8 absolute, 1e-5 relative
    assert losses(tmp_path) == pytest.approx(losses(one_process_run), rel=1e-5, abs=1e-7)
    one, two = (load_file(run / "quant_state.safetensors") for run in (one_process_run, tmp_path))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    ppl_one, ppl_two = (
        json.loads((run / "results.json").read_text())["perplexity"] for run in (one_process_run, tmp_path)
    )
    assert ppl_two == pytest.approx(ppl_one, rel=1e-4)


def test_fsdp2_bf16_trains_like_ddp_bf16(tiny_model_dir, text_file, tmp_path):
    """Under bf16 FSDP2 keeps fp32 parameters and autocasts like DDP: the quantizer reads the same fp32
    scales, offsets and adapters the export uses (Accelerate's default policy would cast them to bf16)."""
    args = common(tiny_model_dir, text_file) + ["--micro_batch_size", "1", "--mixed_precision", "bf16"]
    for engine in ("ddp", "fsdp2"):
        run_two_processes(engine, *args, "--output_dir", str(tmp_path / engine))
    assert losses(tmp_path / "fsdp2") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-6, abs=0)
    ddp, fsdp = (load_file(tmp_path / r / "quant_state.safetensors") for r in ("ddp", "fsdp2"))
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2"])
def test_sharded_kill_9_then_resume_ends_like_an_uninterrupted_run(engine, tiny_model_dir, text_file, tmp_path):
    """Checkpoints gather the sliced tensors and optimizer state into one file; resuming hands each rank
    its part back, exactly (FSDP2: sliced parameters and moments; ZeRO: per-rank optimizer partitions)."""
    args = common(tiny_model_dir, text_file, phase2_steps=40) + ["--save_every", "3", "--micro_batch_size", "1"]
    straight, run = tmp_path / "straight", tmp_path / "killed"
    run_two_processes(engine, *args, "--output_dir", str(straight))
    launcher = run_two_processes(
        engine, *args, "--output_dir", str(run),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # one process group: torchrun and both workers die together
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").is_file():
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert 3 <= checkpoint["step"] < 42 and not (run / "results.json").exists()
    assert checkpoint["quant_state"]["model.layers.0.self_attn.q_proj.lora_a"].shape == (4, 64)  # whole, not a slice
    resumed_alone = subprocess.run(
        [sys.executable, "-m", "dlqat", "train", *args, "--output_dir", str(run), "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed_alone.returncode != 0 and "resume on the engine that wrote it" in resumed_alone.stderr
    run_two_processes(engine, *args, "--output_dir", str(run), "--resume")
    expected, resumed = (load_file(r / "quant_state.safetensors") for r in (straight, run))
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=0, rtol=0)


def test_a_stale_build_lock_is_named_instead_of_hanging_every_rank(tmp_path, monkeypatch):
    """A killed DeepSpeed op build leaves a lock that torch would wait on forever: refuse, naming it."""
    from dlqat.sharding import STALE_LOCK_AGE_S, check_no_stale_build_lock, make_accelerator

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    check_no_stale_build_lock(tmp_path)  # a young lock is a build in progress: wait on it as torch does
    old = time.time() - STALE_LOCK_AGE_S - 60
    os.utime(lock, (old, old))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match=f"stale build lock {lock}.*delete it"):
        make_accelerator(grad_accum=1, mixed_precision="no", micro_batch_size=1, max_grad_norm=1.0)


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
        quant_lr=1e-4, micro_batch_size=1, eval_max_windows=2, save_every=2, init="minmax",  # one RTN eval
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"loss became nan at step \d+ .*checkpoint.pt"):
        train(method, cfg)
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["quant_state"].values())
