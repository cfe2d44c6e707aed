"""``--start_cache``: a calibrated GPTQ start saved once and loaded by later runs, bit for bit."""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_configs, tiny_model
from dlqat import calibrate, prepare
from dlqat.cli import main as cli_main
from dlqat.methods import DLQATConfig, QALoRAConfig, handler
from dlqat.start_cache import (
    StartCacheError,
    describe_starts,
    load_start,
    model_digest,
    prune_starts,
    save_start,
    start_key,
    stored_starts,
)
from dlqat.train import fit


@pytest.mark.parametrize(
    "cfg",
    [DLQATConfig(n_bits=3, group_size=32, rank=2, init="gptq-mse"),
     QALoRAConfig(n_bits=3, group_size=32, rank=2, base="gptq")],
    ids=["dl_qat-gptq-mse", "qa_lora-gptq"],
)  # fmt: skip
def test_loaded_start_equals_a_fresh_calibration(tmp_path, cfg):
    """The handler's calibrated state, through a cache file and ``load_calibrated`` into a freshly prepared
    copy, gives the calibrated model exactly: same tensors, same logits."""
    model = tiny_model("llama")
    loaded = copy.deepcopy(model)
    batches = [torch.randint(0, 300, (1, 16)) for _ in range(4)]
    names = prepare(model, cfg)
    prepare(loaded, cfg)
    calibrate(model, cfg, names, batches)
    method = handler(cfg)
    state = method.calibrated_state(model, cfg, names)
    assert len(state) == 3 * len(names)
    path = tmp_path / "start.safetensors"
    save_start(path, "k", {"n_bits": 3}, state)
    method.load_calibrated(loaded, cfg, names, load_start(path, "k", method.calibrated_state(loaded, cfg, names)))
    for key, tensor in method.calibrated_state(loaded, cfg, names).items():
        assert torch.equal(tensor, state[key]), key
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)  # B = 0: the LoRA init adds nothing


def test_no_state_to_cache_without_a_calibrated_start():
    cfg = DLQATConfig(n_bits=3, group_size=32, rank=2, init="mse")
    model = tiny_model("llama")
    assert handler(cfg).calibrated_state(model, cfg, prepare(model, cfg)) == {}


def test_a_run_loads_the_start_an_earlier_run_saved(tiny_model_dir, text_file, tmp_path, monkeypatch, caplog):
    """A second run with another lr and seed finds the first run's start: it does not calibrate, and its
    untrained start evaluates to the same perplexity; another bit width is another start (a second file)."""
    cache = tmp_path / "starts"
    method, cfg = tiny_configs(tiny_model_dir, text_file, tmp_path / "a", init="gptq", phase1_steps=1,
                               phase2_steps=2, start_cache=str(cache))  # fmt: skip
    first = fit(None, None, method, cfg)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated although the start was cached")

    with monkeypatch.context() as patch:
        patch.setattr(type(handler(method)), "calibrate", no_calibration)
        with caplog.at_level(logging.INFO, logger="dlqat.train"):
            second = fit(None, None, replace(method, lr=3e-3), replace(cfg, output_dir=str(tmp_path / "b"), seed=7))
    assert "loaded from" in caplog.text and str(files[0]) in caplog.text
    assert second["perplexity"]["gptq"] == first["perplexity"]["gptq"]
    assert second["perplexity"]["dl_qat"] != first["perplexity"]["dl_qat"]  # it did train, differently

    two_bits = replace(method, n_bits=2, clip_mode="learn_then_fix")  # keeps its phase 1 (2-bit default: joint)
    fit(None, None, two_bits, replace(cfg, output_dir=str(tmp_path / "c")))
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_start_key_and_digest_change_with_what_defines_the_start():
    model = tiny_model("llama")
    digest = model_digest(model)
    assert model_digest(copy.deepcopy(model)) == digest
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_digest(model) != digest
    fields = {"model": digest, "n_bits": 3}
    assert start_key(fields) == start_key(dict(fields)) != start_key({**fields, "n_bits": 2})


def test_a_bad_cache_file_is_refused_naming_it(tmp_path):
    expected = {"layer.weight": torch.zeros(4, 4)}
    path = tmp_path / "k.safetensors"
    assert load_start(path, "k", expected) is None  # no file: calibrate
    path.write_bytes(b"not safetensors")
    with pytest.raises(StartCacheError, match="k.safetensors.*not a readable start file"):
        load_start(path, "k", expected)
    save_file({"layer.weight": torch.zeros(4, 3)}, path, metadata={"key": "k"})
    with pytest.raises(StartCacheError, match=r"layer.weight is \(4, 3\).*expected \(4, 4\)"):
        load_start(path, "k", expected)
    save_file({"other": torch.zeros(4, 4)}, path, metadata={"key": "k"})
    with pytest.raises(StartCacheError, match="missing \\['layer.weight'\\]"):
        load_start(path, "k", expected)
    save_file({"layer.weight": torch.zeros(4, 4)}, path, metadata={"key": "other"})
    with pytest.raises(StartCacheError, match="records key 'other'"):
        load_start(path, "k", expected)


def test_a_cache_path_that_is_a_file_is_refused(tiny_model_dir, text_file, tmp_path):
    not_a_folder = tmp_path / "starts"
    not_a_folder.write_text("mine")
    method, cfg = tiny_configs(tiny_model_dir, text_file, tmp_path / "run", init="gptq", phase1_steps=1,
                               phase2_steps=1, start_cache=str(not_a_folder))  # fmt: skip
    with pytest.raises(StartCacheError, match="starts.*not a folder"):
        fit(None, None, method, cfg)
    assert not_a_folder.read_text() == "mine"


def test_starts_lists_what_each_file_is_and_prunes_only_unused_dlqat_starts(tmp_path, capsys):
    """``dlqat starts``: a load refreshes a start's "last used"; pruning removes the dlqat starts unused for
    longer than asked and nothing else: not a fresh start, not another program's safetensors, not a file
    whose recorded key is not its name."""
    tensors = {"layer.weight": torch.zeros(64, 64)}
    days = 86400
    now = time.time()
    for key, start, age_days in (("old", "gptq-mse", 10), ("used", "gptq", 10), ("new", "gptq", 1)):
        save_start(tmp_path / f"{key}.safetensors", key, {"start": start, "n_bits": 2, "layers": ["a", "b"]}, tensors)
        os.utime(tmp_path / f"{key}.safetensors", (now - age_days * days, now - age_days * days))
    load_start(tmp_path / "used.safetensors", "used", tensors)  # a run loads it: used now
    save_file(tensors, tmp_path / "model.safetensors")  # not ours (no producer)
    save_file(tensors, tmp_path / "renamed.safetensors", metadata={"key": "old", "producer": "dlqat start cache"})
    odd = {"key": "odd", "producer": "dlqat start cache", "fields": "[1]"}  # ours by name, but not what we write
    save_file(tensors, tmp_path / "odd.safetensors", metadata=odd)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    save_start(elsewhere / "link.safetensors", "link", {"start": "gptq"}, tensors)  # a start, but not this folder's
    (tmp_path / "link.safetensors").symlink_to(elsewhere / "link.safetensors")
    for other in ("model", "renamed", "odd", "link"):
        os.utime(tmp_path / f"{other}.safetensors", (now - 30 * days, now - 30 * days))
    (tmp_path / "notes.txt").write_text("mine")

    starts, others = stored_starts(tmp_path)
    assert [s.path.stem for s in starts] == ["used", "new", "old"]  # most recently used first
    assert [p.stem for p in others] == ["link", "model", "odd", "renamed"]
    assert starts[2].fields == {"start": "gptq-mse", "n_bits": 2, "layers": ["a", "b"]}
    table = describe_starts(starts, others)
    assert "| old.safetensors | 0 |" in table and "| gptq-mse | None | 2 | None | 2 |" in table
    assert (
        "3 start files" in table and "not a dlqat start (left alone): " + str(tmp_path / "model.safetensors") in table
    )

    assert [s.path.stem for s in prune_starts(tmp_path, 5, now=now)] == ["old"]
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == [
        "link.safetensors", "model.safetensors", "new.safetensors", "notes.txt", "odd.safetensors",
        "renamed.safetensors", "used.safetensors",
    ]  # fmt: skip
    assert (elsewhere / "link.safetensors").is_file()
    with pytest.raises(ValueError, match="prune_unused_days=-1.*>= 0"):
        prune_starts(tmp_path, -1)

    assert cli_main(["starts", str(tmp_path), "--prune_unused_days", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"removed {tmp_path / 'new.safetensors'}" in out and "1 start files" in out
    assert (tmp_path / "used.safetensors").is_file() and (tmp_path / "model.safetensors").is_file()
    assert cli_main(["starts", str(tmp_path / "missing")]) == 2
    assert "missing': no such folder" in capsys.readouterr().err
