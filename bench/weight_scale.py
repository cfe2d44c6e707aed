"""How big a model's quantized weights are, per projection kind: weight RMS and the median group step
``s`` of the min/max grid. Adam moves each LoRA entry by about the lr per step whatever the weight's
size, so the same ``--lr`` flips more codes on a model whose steps are small; the magnitude ``m`` is a
relative factor and does not care. This prints the ratio a user needs to carry an lr across models.

    python bench/weight_scale.py                       # the embedded SmolLM2-135M
    python bench/weight_scale.py --models default,$G3  # against Gemma-3-270m (README, Gemma section)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from dlqat.eval.tables import markdown_table
from dlqat.models import load_model
from dlqat.quant.primitives import minmax_scale_offset
from dlqat.surgery import DEFAULT_TARGETS, name_filter


def weight_scales(model: torch.nn.Module, n_bits: int, group_size: int) -> dict[str, tuple[float, float]]:
    """Projection kind (``q_proj``, ...) -> (mean weight RMS, mean of the layers' median group step)."""
    targets = name_filter(DEFAULT_TARGETS)
    per_kind: dict[str, list[tuple[float, float]]] = {}
    for name, module in model.named_modules():
        if targets(name, module):
            weight = module.weight.detach().float()
            scale, _ = minmax_scale_offset(weight, n_bits, group_size)
            rms = weight.pow(2).mean().sqrt().item()
            per_kind.setdefault(name.rsplit(".", 1)[-1], []).append((rms, scale.median().item()))
    return {
        kind: (statistics.fmean(r for r, _ in rows), statistics.fmean(s for _, s in rows))
        for kind, rows in per_kind.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default", help="comma-separated model specs; 'default' = embedded")
    parser.add_argument("--n_bits", type=int, default=4)
    parser.add_argument("--group_size", type=int, default=128)
    args = parser.parse_args()
    specs = args.models.split(",")
    scales = {}
    for spec in specs:
        model, _ = load_model(None if spec == "default" else spec)
        scales[spec] = weight_scales(model, args.n_bits, args.group_size)
        del model
    names = [spec if spec == "default" else Path(spec).stem for spec in specs]
    header = ["projection"] + [f"{name}: {col}" for name in names for col in ("RMS", "median s")]
    if len(specs) > 1:
        header.append(f"step ratio {names[0]} / {names[1]}")
    rows = []
    for kind in scales[specs[0]]:
        row = [kind] + [f"{value:.4f}" for spec in specs for value in scales[spec].get(kind, (float("nan"),) * 2)]
        if len(specs) > 1 and kind in scales[specs[1]]:
            row.append(f"{scales[specs[0]][kind][1] / scales[specs[1]][kind][1]:.1f}x")
        rows.append(row)
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
