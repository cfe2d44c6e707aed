"""The public API: every method through one set of functions keyed by its config, a new method in a
few lines, and the README's Python example as written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import dlqat
from conftest import tiny_model
from dlqat.methods.base import Phase, param_of, swap_in_quant_lora


@dataclass
class ToyConfig(dlqat.QuantMethodConfig):  # a new method: config + handler + registration, < 30 lines
    """Only the magnitudes train (DL-QAT without adapters or range learning)."""

    name: ClassVar[str] = "toy_magnitude"
    steps: int | None = None
    lr: float = 1e-3


@dlqat.register_method(ToyConfig)
class ToyMethod(dlqat.QuantMethod):
    def prepare(self, model, cfg):
        return swap_in_quant_lora(model, cfg, rank=1, alpha=1.0, use_magnitude=True, clip_mode="learn_then_fix")

    def phases(self, cfg, layer_names):
        return [Phase("toy: magnitude", cfg.steps, cfg.lr, param_of("magnitude"))]


def test_a_toy_method_plugs_in_and_trains(tiny_model_dir, text_file, tmp_path):
    from dlqat.cli import parse_train_args
    from dlqat.methods import method_names

    assert "toy_magnitude" in method_names()
    method_cfg, train_cfg = parse_train_args(["--method", "toy_magnitude", "--steps", "3", "--group_size", "32", "--model",
                                              str(tiny_model_dir), "--data", str(text_file)])  # fmt: skip
    assert isinstance(method_cfg, ToyConfig)
    from dataclasses import replace

    train_cfg = replace(train_cfg, eval_data=str(text_file), output_dir=str(tmp_path / "toy"), seq_len=32,
                        eval_seq_len=32, eval_max_windows=2, grad_accum=1, progress=False)  # fmt: skip
    results = dlqat.fit(None, None, method_cfg, train_cfg)
    # one magnitude per (output row, group of 32): q 64x2, k 32x2, v 32x2, o 64x2, gate/up 96x2, down 64x3, 2 layers
    assert results["trainable_params"] == {"toy: magnitude": 2 * (128 + 64 + 64 + 128 + 192 + 192 + 192)}
    assert set(results["perplexity"]) == {"float", "rtn", "toy_magnitude"}
    assert (tmp_path / "toy" / "quantized" / "model.safetensors").is_file()


def test_unregistered_config_says_how_to_register():
    @dataclass
    class Orphan(dlqat.QuantMethodConfig):
        name: ClassVar[str] = "orphan"

    with pytest.raises(TypeError, match=r"@register_method\(Orphan\)"):
        dlqat.prepare(tiny_model(), Orphan())


def test_phases_before_defaults_names_the_field():
    with pytest.raises(ValueError, match=r"DLQATConfig.phase1_steps is unset"):
        dlqat.phases(dlqat.DLQATConfig())


@pytest.mark.parametrize("cfg", [dlqat.RTNConfig(group_size=32), dlqat.GPTQConfig(group_size=32, calib_samples=2)])
def test_post_training_methods_through_the_same_functions(cfg):
    model = tiny_model()
    names = dlqat.prepare(model, cfg)
    assert dlqat.phases(cfg, names) == []
    dlqat.finalize(model, cfg, names, [torch.randint(0, 300, (1, 16)) for _ in range(2)])
    assert set(dlqat.convert(model)) == set(names)


def test_readme_python_example_runs(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """The README's "Python API" block, run as written on the tiny model and text."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    code = code.replace('"HuggingFaceTB/SmolLM2-135M"', repr(str(tiny_model_dir)))
    code = code.replace('"train.txt"', repr(str(text_file))).replace('"heldout.txt"', repr(str(text_file)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README, under test
    assert (tmp_path / "runs" / "readme" / "quantized" / "dlqat_quant.json").is_file()
