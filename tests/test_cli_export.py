"""`dlqat export` and `dlqat generate` on a tiny trained run."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_args
from dlqat.cli import main
from dlqat.export import load_quantized


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert (
        main(
            [
                "train",
                *tiny_args(tiny_model_dir, text_file, out, rank=2, phase1_steps=1, phase2_steps=2),
            ]
        )
        == 0
    )
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_dlqat_fp32_is_exact_and_bf16_is_smaller(run_dir, tmp_path, capsys):
    ids = torch.randint(0, 300, (1, 20))
    ref = logits(load_quantized(run_dir / "quantized")[0], ids)
    assert main(["export", str(run_dir), "--format", "dlqat", "--dtype", "fp32", "--out", str(tmp_path / "fp32")]) == 0
    torch.testing.assert_close(logits(load_quantized(tmp_path / "fp32")[0], ids), ref, atol=0, rtol=0)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "bf16")]) == 0
    assert "MiB" in capsys.readouterr().out

    def size(folder):
        return (folder / "model.safetensors").stat().st_size

    assert size(tmp_path / "bf16") < 0.75 * size(tmp_path / "fp32")
    bf16 = logits(load_quantized(tmp_path / "bf16", dtype=torch.float32)[0], ids)
    assert (bf16.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_export_gguf_loads_in_transformers(run_dir, tmp_path):
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    gg = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 20))
    ref = logits(load_quantized(run_dir / "quantized")[0], ids)
    torch.testing.assert_close(logits(gg, ids), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "dequant"])
def test_generate_streams_text(run_dir, capsys, backend):
    assert main(["generate", str(run_dir), "--prompt", "The quick", "--max-new-tokens", "5", "--backend", backend]) == 0
    assert capsys.readouterr().out.startswith("The quick")


def test_export_errors(run_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "dlqat_quant.json" in capsys.readouterr().err
    assert (
        main(["export", str(run_dir), "--format", "gguf", "--template", "/nope.gguf", "--out", str(tmp_path / "y")])
        == 2
    )
    assert "template='/nope.gguf'" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["auto", "dequant"])
def test_export_with_quantized_embedding_generates(run_dir, tmp_path, capsys, backend):
    out = tmp_path / "e4"
    argv = [
        "export",
        str(run_dir),
        "--embed-bits",
        "4",
        "--embed-group-size",
        "32",
        "--dtype",
        "fp32",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5", "--backend", backend]) == 0
    assert capsys.readouterr().out.startswith("The quick")
    assert (
        main(["export", str(run_dir), "--format", "gguf", "--embed-bits", "8", "--out", str(tmp_path / "m.gguf")]) == 2
    )
    assert "only the dlqat format" in capsys.readouterr().err
