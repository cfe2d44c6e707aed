"""Nothing a user has is lost, nothing received is run: refused writes, safe checkpoints, checked resumes,
and one-line errors (exit code 2) for bad input, each leaving every existing file byte-identical."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_args
from dlqat import loop, run_folder
from dlqat.cli import main
from dlqat.run_folder import load_checkpoint

RUN_FLAGS = {"n_bits": 4, "rank": 2, "phase1_steps": 2, "phase2_steps": 4, "save_every": 2}


def digest(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` -> its SHA-1 (a folder's state, to compare before/after)."""
    files = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "run"
    assert main(["train", *tiny_args(tiny_model_dir, text_file, out, **RUN_FLAGS)]) == 0
    return out


@pytest.fixture()
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def refused(argv: list[str], capsys, *needles: str, watch: tuple[Path, ...] = ()) -> str:
    """``dlqat argv`` exits 2 with one error line naming each needle, and changes no file under ``watch``."""
    before = digest(*watch)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("dlqat ")][-1]
    for needle in needles:
        assert needle in line, (needle, line)
    assert digest(*watch) == before
    return line


# 1. export never empties a folder it did not write ------------------------------------------------------


def test_export_refuses_a_folder_with_user_files(finished_run, tmp_path, capsys):
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep").write_text("x")
    refused(["export", str(finished_run), "--out", str(target)], capsys, str(target), "not a dlqat export",
            watch=(target, finished_run))  # fmt: skip
    refused(["export", str(finished_run), "--out", str(target), "--overwrite"], capsys, "not a dlqat export",
            watch=(target,))  # fmt: skip


def test_export_refuses_the_run_folder_and_the_current_folder(finished_run, tmp_path, capsys, monkeypatch):
    refused(["export", str(finished_run), "--out", str(finished_run)], capsys, str(finished_run), watch=(finished_run,))
    refused(["export", str(finished_run), "--out", str(finished_run / "quantized"), "--overwrite"], capsys,
            "is the model being exported", watch=(finished_run,))  # fmt: skip
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    refused(["export", str(finished_run), "--out", "."], capsys, "not a dlqat export", watch=(cwd,))


def test_export_replaces_only_its_own_export_and_only_with_overwrite(finished_run, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["export", str(finished_run), "--out", str(out), "--dtype", "fp32"]) == 0
    refused(["export", str(finished_run), "--out", str(out)], capsys, "--overwrite", watch=(out,))
    assert main(["export", str(finished_run), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "dlqat_quant.json").read_text())["format"] == "dlqat-packed-v1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]  # no temporary left


def test_gguf_export_never_overwrites_another_file(finished_run, tmp_path, capsys):
    target = tmp_path / "notes.gguf"
    target.write_text("not a gguf")
    refused(["export", str(finished_run), "--format", "gguf", "--out", str(target), "--overwrite"], capsys,
            "is not a GGUF file", watch=(target,))  # fmt: skip


# 2. a received checkpoint is data, never code ------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(run_copy, tiny_model_dir, text_file, capsys):
    marker = run_copy.parent / "payload-ran"
    real = load_checkpoint(run_copy / "checkpoint.pt")
    torch.save({**real, "results": _Payload(marker)}, run_copy / "checkpoint.pt")
    argv = ["train", *tiny_args(tiny_model_dir, text_file, run_copy, **RUN_FLAGS), "--resume"]
    refused(argv, capsys, "checkpoint.pt", "refused", "nothing from it was run", watch=(run_copy,))
    assert not marker.exists()
    torch.load(run_copy / "checkpoint.pt", weights_only=False)  # what the old resume did: the payload runs
    assert marker.read_text() == "pwned"


# 3. a resume continues the same run or nothing ----------------------------------------------------------


@pytest.mark.parametrize(
    "change,named",
    [({"n_bits": 3}, "n_bits: 4 -> 3"), ({"group_size": 16}, "group_size: 32 -> 16"), ({"seed": 7}, "seed: 42 -> 7"),
     ({"method": "l4q", "steps": 6}, "method: 'dl_qat' -> 'l4q'")],
)  # fmt: skip
def test_resume_with_other_settings_is_refused_naming_each_field(change, named, run_copy, tiny_model_dir, text_file,
                                                                  capsys):  # fmt: skip
    flags = {**RUN_FLAGS, **change}
    if "method" in change:
        flags = {k: v for k, v in flags.items() if not k.startswith("phase")}
    argv = ["train", *tiny_args(tiny_model_dir, text_file, run_copy, **flags), "--resume"]
    refused(argv, capsys, named, "--resume with other settings", watch=(run_copy,))


def test_resume_may_change_save_every_and_progress(run_copy, tiny_model_dir, text_file):
    flags = {**RUN_FLAGS, "save_every": 5}
    same_file = text_file.parent / ".." / text_file.parent.name / text_file.name  # another spelling, same data
    assert main(["train", *tiny_args(tiny_model_dir, same_file, run_copy, **flags), "--resume"]) == 0


def test_resume_on_edited_data_at_the_same_path_is_refused(tiny_model_dir, text_file, tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text(text_file.read_text())
    argv = ["train", *tiny_args(tiny_model_dir, data, tmp_path / "run", **RUN_FLAGS)]
    assert main(argv) == 0
    data.write_text("One more sentence. " + text_file.read_text())  # same path and settings, other examples
    refused([*argv, "--resume"], capsys, "other training data", "fingerprint", watch=(tmp_path / "run",))


def test_checkpoint_without_a_data_fingerprint_resumes(run_copy, tiny_model_dir, text_file):
    """Written before fingerprints were kept: its data cannot be checked, so it resumes as before."""
    ckpt = load_checkpoint(run_copy / "checkpoint.pt")
    assert len(ckpt["settings"].pop("data_fingerprint")) == 64
    torch.save(ckpt, run_copy / "checkpoint.pt")
    assert main(["train", *tiny_args(tiny_model_dir, text_file, run_copy, **RUN_FLAGS), "--resume"]) == 0


def test_resumed_log_is_cut_back_to_the_checkpoint(tiny_model_dir, text_file, tmp_path, monkeypatch):
    class Killed(Exception):
        pass

    real_step, calls = loop.optimizer_step, {"n": 0}

    def die_after_five(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # steps 1..5 logged, the checkpoint holds step 4
            raise Killed
        return real_step(*args)

    argv = ["train", *tiny_args(tiny_model_dir, text_file, tmp_path / "run", **{**RUN_FLAGS, "save_every": 4})]
    monkeypatch.setattr(loop, "optimizer_step", die_after_five)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


# 5. a folder holding any run is refused unless --resume or --overwrite ----------------------------------------


def test_second_run_into_a_run_folder_is_refused_and_overwrite_keeps_other_files(tiny_model_dir, text_file, tmp_path,
                                                                                  capsys):  # fmt: skip
    out = tmp_path / "rtn"
    argv = ["train", *tiny_args(tiny_model_dir, text_file, out, n_bits=4), "--method", "rtn"]
    assert main(argv) == 0
    (out / "my-notes.txt").write_text("mine")
    refused([*argv[:-2], "--method", "rtn", "--n_bits", "2"], capsys, "holds a run already", "--overwrite",
            watch=(out,))  # fmt: skip
    refused([*argv, "--overwrite", "--resume"], capsys, "pass one of them", watch=(out,))
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "my-notes.txt").read_text() == "mine"


# 6, 8, 9. bad input: exit 2, one line naming the file/flag/value, nothing touched ----------------------------------


def corrupt(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_TRAIN_INPUTS = {
    "no such model folder": ({"model": "./no-such-model"}, "no such model folder"),
    "folder without config.json": ({"model": "{empty}"}, "has no config.json"),
    "data typo, unknown suffix": ({"data": "trian.csv"}, "no such file"),
    "data typo": ({"data": "./trian.txt"}, "not found"),
    "eval text shorter than a window": ({"eval_seq_len": 100000}, "--eval_seq_len=100000"),
    "fp16 on a CPU": ({"mixed_precision": "fp16"}, "mixed_precision='fp16'"),
    "dynamic clipping with a phase 1": ({"clip_mode": "dynamic", "phase1_steps": 5}, "phase1_steps=5"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_INPUTS))
def test_bad_train_input_is_one_line_and_touches_nothing(case, run_copy, tiny_model_dir, text_file, tmp_path, capsys):
    flags, needle = BAD_TRAIN_INPUTS[case]
    (tmp_path / "empty").mkdir()
    flags = {k: str(v).format(empty=tmp_path / "empty") for k, v in flags.items()}
    argv = ["train", *tiny_args(tiny_model_dir, text_file, run_copy, **{**RUN_FLAGS, **flags}), "--overwrite"]
    refused(argv, capsys, needle, watch=(run_copy, tiny_model_dir))


def test_preset_and_a_contradicting_flag_are_refused(capsys):
    refused(["train", "--preset", "dlqat-5", "--clip_mode", "dynamic"], capsys, "--preset dlqat-5", "clip_mode")


def test_corrupt_model_weights_are_named(tiny_model_dir, text_file, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    corrupt(model / "model.safetensors", b"\x00" * 64)
    refused(["train", *tiny_args(model, text_file, tmp_path / "out")], capsys, str(model), watch=(model,))
    assert not (tmp_path / "out" / "run_config.json").exists()


@pytest.mark.parametrize("content", [b"garbage, not a checkpoint", None])
def test_truncated_or_garbage_checkpoint_is_named(content, run_copy, tiny_model_dir, text_file, capsys):
    ckpt = run_copy / "checkpoint.pt"
    corrupt(ckpt, content if content is not None else ckpt.read_bytes()[:1000])
    argv = ["train", *tiny_args(tiny_model_dir, text_file, run_copy, **RUN_FLAGS), "--resume"]
    refused(argv, capsys, str(ckpt), watch=(run_copy,))


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "{run}", "--prompt", ""], "--prompt is empty"),
        (["eval", "{run}", "--seq-len", "0"], "--eval_seq_len=0"),
        (["eval", "{run}", "--max-windows", "-1"], "--eval_max_windows=-1"),
        (["eval", "{run}", "--tasks", "no_such_task", "--task-source", "local"], "no_such_task"),
    ],
)
def test_bad_eval_and_generate_input(argv, needle, finished_run, capsys):
    refused([a.format(run=finished_run) for a in argv], capsys, needle, watch=(finished_run,))


# disk full: the write fails cleanly, the old file stays, no temporary is left -------------------------------


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_export_leaves_nothing_behind(finished_run, tmp_path, capsys, monkeypatch):
    from dlqat.export import quantized

    monkeypatch.setattr(quantized, "save_file", _no_space)
    refused(["export", str(finished_run), "--out", str(tmp_path / "model")], capsys, "no space left",
            watch=(finished_run,))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_a_checkpoint_keeps_the_last_one(run_copy, tmp_path, monkeypatch):
    ckpt = run_copy / "checkpoint.pt"
    before = ckpt.read_bytes()

    def half_then_full(obj, path):
        Path(path).write_bytes(b"partial")
        _no_space()

    monkeypatch.setattr(run_folder.torch, "save", half_then_full)
    with pytest.raises(OSError, match="no space left"):
        run_folder.save_checkpoint({"step": 1}, ckpt)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in run_copy.iterdir() if p.name.endswith(".tmp")) == []


def test_atomic_write_cleans_up_on_any_error(tmp_path):
    from dlqat.fileio import atomic_write_text

    target = tmp_path / "f.json"
    target.write_text("old")

    def boom(_tmp):
        raise KeyboardInterrupt

    from dlqat.fileio import atomic_write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert os.listdir(tmp_path) == ["f.json"] and target.read_text() == "old"
    atomic_write_text(target, "new")
    assert os.listdir(tmp_path) == ["f.json"] and target.read_text() == "new"


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path):
    """Temporary files are 0600 and folders 0700: renamed into place as they are, every result, checkpoint and
    export would be unreadable to a serving user or a shared group."""
    from dlqat.fileio import atomic_folder, atomic_write_text

    old_umask = os.umask(0o022)
    try:
        assert (atomic_write_text(tmp_path / "new.json", "{}").stat().st_mode & 0o777) == 0o644
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o640)
        assert (atomic_write_text(kept, "new").stat().st_mode & 0o777) == 0o640  # a replaced file keeps its mode
        with atomic_folder(tmp_path / "export", lambda _: True, False, "test export") as folder:
            atomic_write_text(folder / "config.json", "{}")
        assert ((tmp_path / "export").stat().st_mode & 0o777) == 0o755
        assert ((tmp_path / "export" / "config.json").stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert (atomic_write_text(tmp_path / "private.json", "{}").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old_umask)


def test_the_umask_is_read_without_being_changed_where_the_kernel_shows_it(monkeypatch):
    """Setting the umask to read it back gives a thread that creates a file meanwhile the wrong mode."""
    from dlqat import fileio

    status = Path("/proc/self/status")
    if not (status.is_file() and "Umask:" in status.read_text()):
        pytest.skip("this kernel does not show the umask in /proc/self/status (Linux < 4.7, not Linux)")
    old_umask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("umask changed to read it"))
        assert fileio.process_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old_umask)
