"""The comparison methods: each pinned by its defining property."""

import csv
import json
import logging

import pytest
import torch
from torch import nn

from conftest import tiny_args, tiny_eval_args, tiny_model
from dlqat import finalize, phases, prepare
from dlqat.cli import main, parse_train_args
from dlqat.compare import curve_schedule_flags, steps_flags
from dlqat.export import convert
from dlqat.layers import QuantizedLinear
from dlqat.layers.qa_lora_linear import QALoRALinear
from dlqat.methods import GPTQConfig, handler, make_config, method_names
from dlqat.methods.base import set_trainable
from dlqat.methods.ptq import FloatLoRAFields
from dlqat.quant import dequantize, minmax_scale_offset, mse_scale_offset, quantize
from dlqat.quant.gptq import gptq_quantize


@pytest.mark.parametrize("in_features,group_size", [(96, 32), (96, 64), (80, -1)])
def test_qa_lora_merges_into_offsets_exactly(in_features, group_size):
    layer = QALoRALinear(nn.Linear(in_features, 16), n_bits=3, group_size=group_size, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.1)
    x = torch.randn(5, in_features, dtype=torch.float32)
    # pooling is the plain mean over each group's own columns (ragged last group included)
    g = in_features if group_size == -1 else group_size
    ref_pool = torch.stack([x[:, c : c + g].mean(1) for c in range(0, in_features, g)], dim=1)
    torch.testing.assert_close(layer.pool(x), ref_pool)
    trained = layer(x)
    q, scale, offset = layer.to_codes()
    torch.testing.assert_close(q, layer.q, atol=0, rtol=0)  # same codes: the adapter only moves offsets
    merged = QuantizedLinear.from_codes(q, scale, offset, 3, group_size, layer.bias)
    torch.testing.assert_close(merged(x), trained, atol=1e-5, rtol=1e-5)


def test_qa_lora_and_l4q_phases():
    cfg = make_config("qa_lora", group_size=32, rank=2, steps=3)
    model = tiny_model()
    names = prepare(model, cfg)
    (phase,) = phases(cfg, names)
    assert {n.rsplit(".", 1)[-1] for n in set_trainable(model, phase.trains)} == {"lora_a", "lora_b"}
    assert model.model.layers[0].mlp.down_proj.lora_a.shape == (2, 96 // 32)
    cfg = make_config("l4q", group_size=32, rank=2, steps=3, lr=1e-3, quant_lr=1e-5)
    model = tiny_model()
    prepare(model, cfg)
    (phase,) = phases(cfg)
    selected = set_trainable(model, phase.trains)
    assert {n.rsplit(".", 1)[-1] for n in selected} == {"lora_a", "lora_b", "scale", "offset"}
    assert sorted(g["lr"] for g in phase.param_groups(model)) == [1e-5, 1e-3]
    assert not any(n.endswith("magnitude") for n, _ in model.named_parameters())


@pytest.mark.parametrize("grid,rtn_range", [("minmax", minmax_scale_offset), ("mse", mse_scale_offset)])
def test_gptq_equals_rtn_when_inputs_are_uncorrelated(grid, rtn_range):
    """No error to spread (H = I): GPTQ is round-to-nearest on its grid's ranges (incl. a ragged group)."""
    w = torch.randn(24, 112)
    q, scale, offset = gptq_quantize(w, torch.eye(112), 3, 32, damp=0.0, grid=grid)
    s_ref, b_ref = rtn_range(w, 3, 32)
    torch.testing.assert_close(scale, s_ref, atol=0, rtol=0)
    torch.testing.assert_close(offset, b_ref, atol=0, rtol=0)
    torch.testing.assert_close(q.float(), quantize(w, s_ref, b_ref, 3, 32), atol=0, rtol=0)
    with pytest.raises(ValueError, match="grid='mean'"):
        gptq_quantize(w, torch.eye(112), 3, 32, grid="mean")


def test_gptq_clipping_search_lowers_output_error_at_2_bits():
    """Why ``grid="mse"`` exists: at 2 bits a min/max range spends its 4 levels on outliers."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(1024, 16) @ torch.randn(16, 128) + 0.3 * torch.randn(1024, 128)
    hessian = 2 * x.t() @ x / 1024

    def output_error(grid: str) -> float:
        q, scale, offset = gptq_quantize(w, hessian, 2, 64, grid=grid)
        return (x @ (w - dequantize(q.float(), scale, offset, 64)).t()).pow(2).mean().item()

    assert output_error("mse") < 0.9 * output_error("minmax")


@pytest.mark.parametrize("group_size", [32, 48, -1])
def test_gptq_lowers_output_error_on_correlated_inputs(group_size):
    torch.manual_seed(0)
    w = torch.randn(32, 96)
    x = torch.randn(512, 8) @ torch.randn(8, 96) + 0.1 * torch.randn(512, 96)  # low-rank, correlated
    q, scale, offset = gptq_quantize(w, 2 * x.t() @ x / 512, 3, group_size)
    assert q.min() >= -4 and q.max() <= 3
    s_rtn, b_rtn = minmax_scale_offset(w, 3, group_size)
    w_rtn = dequantize(quantize(w, s_rtn, b_rtn, 3, group_size), s_rtn, b_rtn, group_size)
    w_gptq = dequantize(q.float(), scale, offset, group_size)

    def output_error(wq):
        return (x @ (w - wq).t()).pow(2).mean()

    assert output_error(w_gptq) < 0.7 * output_error(w_rtn)


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_lora_then_ptq_quantizes_the_merged_weight(algorithm):
    model = tiny_model()
    cfg = make_config(f"lora_{algorithm}", group_size=32, rank=2, steps=1)
    names = prepare(model, cfg)
    layer = model.get_submodule(names[0])
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.1)
    merged = layer.merged_weight().detach().clone()
    finalize(model, cfg, names, [torch.randint(0, 300, (1, 16)) for _ in range(4)])
    out = model.get_submodule(names[0])
    assert isinstance(out, QuantizedLinear)
    if algorithm == "rtn":
        s, b = minmax_scale_offset(merged, 4, 32)
        torch.testing.assert_close(
            out.dequantized_weight(), dequantize(quantize(merged, s, b, 4, 32), s, b, 32), atol=0, rtol=0
        )
    assert convert(model)  # already converted: convert() reports the layers
    assert len(convert(model)) == len(names)


def test_full_qat_trains_only_quantized_weights():
    model = tiny_model()
    cfg = make_config("full_qat", group_size=32, steps=1, lr=1e-2)
    names = prepare(model, cfg)
    (phase,) = phases(cfg, names)
    selected = set_trainable(model, phase.trains)
    assert sorted(selected) == sorted(f"{n}.weight" for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 300, (2, 12))
    opt = torch.optim.AdamW(phase.param_groups(model))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(selected)


def test_presets_and_method_flags():
    cfg, _ = parse_train_args(["--preset", "dlqat-1"])
    assert cfg.use_magnitude is False and cfg.clip_mode == "dynamic"
    cfg, _ = parse_train_args(["--method", "lora_gptq", "--steps", "3"])
    assert isinstance(cfg, GPTQConfig) and isinstance(cfg, FloatLoRAFields) and cfg.steps == 3
    assert cfg.to_dict()["method"] == "lora_gptq"  # recorded under its own name (a PTQConfig was always "gptq")
    cfg, train_cfg = parse_train_args(["--preset", "paper"])
    assert (cfg.lr, cfg.quant_lr, cfg.init, train_cfg.loss) == (2e-4, 2e-4, "minmax", "ce")
    assert train_cfg.lr_schedule == "constant"
    with pytest.raises(ValueError, match="--lr_schedule contradicts"):  # the hyphen spelling is the same flag
        parse_train_args(["--preset", "paper", "--lr-schedule", "cosine"])
    with pytest.raises(ValueError, match="preset='dlqat-9'"):
        parse_train_args(["--preset", "dlqat-9"])
    cfg, _ = parse_train_args(["--method", "qa_lora", "--preset", "paper"])  # presets are keyed by method
    assert (cfg.base, cfg.rank, cfg.alpha, cfg.lr) == ("gptq", 64, 16.0, 2e-4)
    with pytest.raises(ValueError, match="preset='dlqat-1' with --method qa_lora"):
        parse_train_args(["--method", "qa_lora", "--preset", "dlqat-1"])
    with pytest.raises(ValueError, match="preset='paper' with --method l4q: expected one of \\[\\]"):
        parse_train_args(["--method", "l4q", "--preset", "paper"])
    with pytest.raises(ValueError, match="method='nope'"):
        parse_train_args(["--method", "nope"])


@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_from_the_cli(method, tiny_model_dir, text_file, tmp_path):
    steps = (
        []
        if method in ("rtn", "gptq")
        else (["--phase1_steps", "1", "--phase2_steps", "1"] if method == "dl_qat" else ["--steps", "2"])
    )
    out = tmp_path / method
    assert (
        main(
            [
                "train",
                "--method",
                method,
                *tiny_args(tiny_model_dir, text_file, out),
                *steps,
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["method"] == method and method in results["perplexity"]
    if method != "rtn":
        starts_at = handler(make_config(method)).starts_at(make_config(method))
        # a method that starts quantized reports its start and, if that is not plain RTN, the RTN row too
        assert ("rtn" in results["perplexity"]) == (starts_at is not None)
        assert starts_at is None or starts_at in results["perplexity"]
    assert main(tiny_eval_args(out, text_file, tmp_path / "e.json")) == 0
    assert json.loads((tmp_path / "e.json").read_text())["perplexity"]["perplexity"] == results["perplexity"][method]


def test_compare_writes_table_csv_and_plot(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "rtn,dl_qat", "--bits", "4,3", "--group_size", "32", "--steps", "2", "--output_dir",
            str(out), "--model", str(tiny_model_dir), "--data", str(text_file), "--eval_data", str(text_file),
            "--seq_len", "32", "--grad_accum", "1", "--eval_seq_len", "32", "--eval_max_windows", "2",
            "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["bits"]) for r in rows] == [("rtn", "4"), ("dl_qat", "4"), ("rtn", "3"), ("dl_qat", "3")]
    assert all(float(r["peak_memory_mb"]) > 0 for r in rows)
    assert "| dl_qat | 3 | 32 |" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").stat().st_size > 1000
    # RTN through the rtn method equals the dl_qat run's untrained (RTN) row
    for bits in ("4", "3"):
        rtn_run = next(r for r in rows if r["method"] == "rtn" and r["bits"] == bits)
        dl = next(r for r in rows if r["method"] == "dl_qat" and r["bits"] == bits)
        assert float(rtn_run["perplexity"]) == pytest.approx(float(dl["rtn"]), rel=1e-6)
    # a run killed before its first checkpoint (RTN writes none) leaves only its run_config.json: the next
    # compare starts it again instead of failing on the occupied folder
    killed = out / "rtn-w3g32"
    (killed / "results.json").unlink()
    assert (killed / "run_config.json").is_file() and not (killed / "checkpoint.pt").exists()
    assert main(argv) == 0
    with open(out / "comparison.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["perplexity"] for r in again] == [r["perplexity"] for r in rows]
    # a finished run is reused only with the settings it ran with: another seed is refused, naming the field,
    # instead of reporting the seed-42 numbers as the seed-7 run
    capsys.readouterr()
    assert main([*argv, "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'rtn-w4g32'} holds a rtn run with other settings than this comparison asks for" in err
    assert "seed: 42 -> 7" in err


def test_full_qat_checkpoint_holds_the_trained_weights(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "fq"
    assert (
        main(
            [
                "train",
                "--method",
                "full_qat",
                *tiny_args(tiny_model_dir, text_file, out),
                "--steps",
                "2",
                "--save_every",
                "1",
            ]
        )
        == 0
    )
    state = torch.load(out / "checkpoint.pt", weights_only=False)["quant_state"]
    assert "model.layers.0.mlp.down_proj.weight" in state and "model.layers.0.input_layernorm.weight" not in state


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: per-layer masks and rotary tables
def test_gptq_block_by_block_equals_the_naive_sequential_loop(arch):
    """Block i is calibrated on the outputs of blocks 0..i-1 *as quantized*: the same codes as a plain
    loop that quantizes one block, then reruns the whole partly quantized model for the next."""
    import copy

    from dlqat.methods.calibration import collect_hessians, decoder_layers

    model = tiny_model(arch).eval()
    naive = copy.deepcopy(model)
    cfg = make_config("gptq", n_bits=3, group_size=32)
    names = prepare(model, cfg)
    batches = [torch.randint(0, 300, (1, 16)) for _ in range(4)]
    finalize(model, cfg, names, batches)

    prefix, layers = decoder_layers(naive)
    for i in range(len(layers)):
        block = [n for n in names if n.startswith(f"{prefix}.{i}.")]
        hessians = collect_hessians(naive, block, batches)
        for name in block:
            linear = naive.get_submodule(name)
            q, s, b = gptq_quantize(linear.weight.detach().float(), hessians[name], 3, 32, cfg.damp)
            parent, child = name.rsplit(".", 1)
            setattr(naive.get_submodule(parent), child, QuantizedLinear.from_codes(q, s, b, 3, 32, linear.bias))
    for name in names:
        ours, ref = model.get_submodule(name), naive.get_submodule(name)
        assert (ours.codes() == ref.codes()).float().mean() > 0.999, name
        torch.testing.assert_close(ours.scale, ref.scale, rtol=1e-4, atol=1e-6)
        # the unpacked weights held while the next block calibrated are released afterwards
        assert ours._dequantized is None and not ours.keep_dequantized, name


def test_gptq_sequential_differs_from_one_float_pass_after_the_first_block():
    model, flat = tiny_model("llama").eval(), tiny_model("llama").eval()
    flat.load_state_dict(model.state_dict())
    batches = [torch.randint(0, 300, (1, 16)) for _ in range(4)]
    for m, sequential in ((model, True), (flat, False)):
        cfg = make_config("gptq", n_bits=3, group_size=32, sequential=sequential)
        finalize(m, cfg, prepare(m, cfg), batches)
    first = "model.layers.0.self_attn.q_proj"  # same float inputs either way
    assert torch.equal(model.get_submodule(first).codes(), flat.get_submodule(first).codes())
    last = "model.layers.1.mlp.down_proj"
    assert not torch.equal(model.get_submodule(last).codes(), flat.get_submodule(last).codes())


def test_compare_draws_learning_curves_on_every_text(tiny_model_dir, text_file, tmp_path, capsys):
    """--steps 2,4: each method trains once for 4 steps, evaluated at 2 and 4 on both texts; RTN is flat."""
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    out = tmp_path / "curves"
    train_flags = ["--model", str(tiny_model_dir), "--data", str(text_file), "--eval_data", str(text_file),
                   "--curve_eval_data", str(other), "--seq_len", "32", "--grad_accum", "1", "--eval_seq_len", "32",
                   "--eval_max_windows", "2", "--no_progress"]  # fmt: skip
    argv = ["compare", "--methods", "rtn,l4q,dl_qat:paper,lora_rtn", "--bits", "3", "--group_size", "32", "--steps",
            "2,4", "--output_dir", str(out), *train_flags]  # fmt: skip
    assert main(argv) == 0
    curve = [json.loads(line) for line in (out / "l4q-w3g32" / "curve.jsonl").read_text().splitlines()]
    assert [(r["step"], r["text"]) for r in curve] == [(2, "train.txt"), (2, "other.txt"), (4, "train.txt"),
                                                        (4, "other.txt")]  # fmt: skip
    for run in ("l4q-w3g32", "dl_qat-paper-w3g32"):  # curves at a constant lr (the paper preset's own)
        assert json.loads((out / run / "run_config.json").read_text())["train_config"]["lr_schedule"] == "constant"
    text = (out / "curves.md").read_text()
    assert "Held-out text: other.txt" in text and "| dl_qat:paper | 3 | 32 |" in text
    with open(out / "comparison.csv") as f:  # the table has a column per held-out text: its last curve point
        l4q_row = next(r for r in csv.DictReader(f) if r["method"] == "l4q")
    assert float(l4q_row["perplexity_other.txt"]) == curve[-1]["perplexity"]
    assert float(l4q_row["perplexity"]) == curve[-2]["perplexity"]
    assert "| method | W | g | perplexity | other.txt | float |" in (out / "comparison.md").read_text()
    rtn_row = next(line for line in text.splitlines() if line.startswith("| rtn |"))
    assert rtn_row.split("|")[4] == rtn_row.split("|")[5]  # flat: no training
    assert (out / "curves.png").stat().st_size > 0
    # LoRA then RTN trains a float + LoRA model: one run per budget, each point its run's quantized result
    from dlqat.compare import run_one  # the finished runs are reused: nothing trains again

    points = {
        (r["step"], r["text"]): r["perplexity"] for r in run_one("lora_rtn", 3, 32, [2, 4], out, train_flags)["curve"]
    }
    for steps, folder in ((2, "lora_rtn-w3g32-2steps"), (4, "lora_rtn-w3g32")):
        finished = json.loads((out / folder / "results.json").read_text())
        assert json.loads((out / folder / "run_config.json").read_text())["method_config"]["steps"] == steps
        assert not (out / folder / "curve.jsonl").exists()
        for text, values in finished["perplexity_by_text"].items():
            assert points[(steps, text)] == values["lora_rtn"]


def test_train_refuses_mid_run_points_of_a_model_quantized_after_training(tiny_model_dir, text_file, tmp_path, capsys):
    """LoRA then RTN/GPTQ: the model being trained is float + LoRA, so ``--eval_at`` would not measure the
    low-bit model; refused before the output folder is made."""
    out = tmp_path / "lora"
    assert main(["train", "--method", "lora_rtn", *tiny_args(tiny_model_dir, text_file, out), "--steps", "4",
                 "--eval_at", "2,4"]) == 2  # fmt: skip
    assert "eval_at='2,4' with method 'lora_rtn': the model it trains is quantized only after training" in (
        capsys.readouterr().err)  # fmt: skip
    assert not out.exists()


def test_compare_refuses_an_unknown_preset_before_any_run(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", "--methods", "rtn,l4q:paper", "--output_dir", str(out)]) == 2
    assert "--methods l4q:paper: preset='paper' with --method l4q: expected one of []" in capsys.readouterr().err
    assert not out.exists()


STEPS_REFUSAL = "expected comma-separated positive integers"
BITS_REFUSAL = "expected comma-separated integers from 2 to 8"


@pytest.mark.parametrize(
    "flag, value, expected",
    [("--steps", v, f"--steps={v!r}: {STEPS_REFUSAL}") for v in ("0", "40,-1", "forty", ",")]
    + [("--bits", v, f"--bits={v!r}: {BITS_REFUSAL}") for v in ("x", "4,1", "9", ",")]
    + [("--group_size", v, f"--group_size={v}: expected a positive integer or -1 (per channel)") for v in ("0", "-2")],
)
def test_compare_refuses_settings_it_cannot_run(tmp_path, capsys, flag, value, expected):
    """Refused before anything trains or writes, naming the flag and the value (0 steps used to run, ',' crash,
    group size 0 was refused only by the first run, after the output folder was made)."""
    out = tmp_path / "c"
    assert main(["compare", "--methods", "rtn", flag, value, "--output_dir", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_compare_pins_a_constant_lr_for_curves_only():
    """A curve is read off one run, so ``auto`` (given or not) is pinned to constant for every method whose
    preset does not set the schedule itself (a flag repeating a preset's setting is refused); one budget
    leaves ``auto`` to each run (DL-QAT then decays its lr from COSINE_FROM_STEPS)."""
    pinned = ["--lr_schedule", "constant"]
    assert curve_schedule_flags("dl_qat", [40, 120], []) == pinned
    assert curve_schedule_flags("l4q", [40, 120], ["--lr-schedule", "auto"]) == pinned
    assert curve_schedule_flags("dl_qat:paper", [40, 120], []) == []
    assert curve_schedule_flags("dl_qat:dlqat-6", [40, 120], []) == pinned
    assert curve_schedule_flags("dl_qat", [40, 120], ["--lr_schedule", "constant"]) == []
    assert curve_schedule_flags("dl_qat", [400], []) == []


def test_compare_refuses_a_curve_with_a_decaying_lr(tmp_path, capsys):
    """Curve points of one cosine run are not the shorter runs: refused before anything trains."""
    out = tmp_path / "c"
    argv = ["compare", "--methods", "dl_qat", "--steps", "2,4", "--output_dir", str(out), "--lr_schedule", "cosine"]
    assert main(argv) == 2
    assert "--lr_schedule cosine" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "method,init,grid,arch",
    [("dl_qat", "gptq", "minmax", "llama"), ("dl_qat", "gptq", "minmax", "gemma3"),
     ("dl_qat", "gptq-mse", "mse", "llama"), ("l4q", "gptq", "minmax", "llama")],
)  # fmt: skip
def test_gptq_start_untrained_equals_gptq(method, init, grid, arch):
    """DL-QAT (or L4Q) ``init="gptq"``: before any step, every layer computes GPTQ's weight (GPTQ's codes,
    ranges), and the model GPTQ's logits; training starts from GPTQ's updated, not-yet-rounded base weight.
    ``init="gptq-mse"`` is the same identity with GPTQ's clipping search (``--method gptq --grid mse``)."""
    import copy

    from dlqat import calibrate

    model = tiny_model(arch).eval()
    gptq = copy.deepcopy(model)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    batches = [torch.randint(0, 300, (1, 16)) for _ in range(4)]
    gptq_cfg = make_config("gptq", n_bits=3, group_size=32, grid=grid)
    finalize(gptq, gptq_cfg, prepare(gptq, gptq_cfg), batches)
    cfg = make_config(method, n_bits=3, group_size=32, rank=2, init=init)
    names = prepare(model, cfg)
    calibrate(model, cfg, names, batches)
    for name in names:
        ours, ref = model.get_submodule(name), gptq.get_submodule(name)
        torch.testing.assert_close(ours.quantized_weight(), ref.dequantized_weight(), atol=1e-6, rtol=0, msg=name)
        assert not torch.equal(ours.weight, original[name]), name  # the base moved to GPTQ's updated weight
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gptq(ids).logits, atol=1e-5, rtol=1e-5)
    assert handler(cfg).starts_at(cfg) == init and not handler(cfg).float_teacher(cfg)


@pytest.mark.parametrize(("base", "grid"), [("gptq", "minmax"), ("gptq-mse", "mse")])
def test_qa_lora_on_a_gptq_base_untrained_equals_gptq(base, grid):
    """QA-LoRA on a GPTQ base (``gptq``, the paper's; ``gptq-mse``, GPTQ's clipping search): after
    calibration every layer holds that GPTQ's codes and ranges exactly, the float weights are gone, and
    the untrained model computes that GPTQ's logits."""
    import copy

    from dlqat import calibrate

    model = tiny_model("llama").eval()
    gptq = copy.deepcopy(model)
    batches = [torch.randint(0, 300, (1, 16)) for _ in range(4)]
    gptq_cfg = make_config("gptq", n_bits=3, group_size=32, grid=grid)
    finalize(gptq, gptq_cfg, prepare(gptq, gptq_cfg), batches)
    cfg = make_config("qa_lora", n_bits=3, group_size=32, rank=4, base=base)
    rtn = copy.deepcopy(model)
    prepare(rtn, make_config("qa_lora", n_bits=3, group_size=32, rank=4))
    names = prepare(model, cfg)
    rtn_codes = {name: model.get_submodule(name).q.clone() for name in names}
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():  # before calibration: RTN (the run's "rtn" row), not the float weights it keeps
        torch.testing.assert_close(model(ids).logits, rtn(ids).logits, atol=0, rtol=0)
    calibrate(model, cfg, names, batches)
    moved = 0
    for name in names:
        ours, ref = model.get_submodule(name), gptq.get_submodule(name)
        assert ours.float_weight is None and "float_weight" not in ours.state_dict(), name
        assert torch.equal(ours.q, ref.codes().to(ours.q.dtype)), name
        weight = dequantize(ours.q.float(), ours.scale, ours.offset, 32)
        torch.testing.assert_close(weight, ref.dequantized_weight(), atol=0, rtol=0, msg=name)
        moved += not torch.equal(ours.q, rtn_codes[name])
    assert moved == len(names)  # GPTQ's codes are not RTN's
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gptq(ids).logits, atol=1e-5, rtol=1e-5)
    assert handler(cfg).starts_at(cfg) == base
    with pytest.raises(ValueError, match="base='awq': expected one of rtn, gptq, gptq-mse"):
        make_config("qa_lora", base="awq")


def test_qa_lora_on_a_gptq_base_trains_and_reports_both_starts(tiny_model_dir, text_file, tmp_path):
    from dlqat.train import train
    from dlqat.train_config import TrainConfig

    cfg = make_config("qa_lora", n_bits=3, group_size=32, rank=4, base="gptq", steps=6, lr=1e-2)
    run = TrainConfig(model=str(tiny_model_dir), data=str(text_file), eval_data=str(text_file), seq_len=32,
                      eval_seq_len=32, output_dir=str(tmp_path / "run"), progress=False, loss="ce")  # fmt: skip
    ppl = train(cfg, run)["perplexity"]
    assert set(ppl) == {"float", "rtn", "gptq", "qa_lora"} and len({ppl["float"], ppl["rtn"], ppl["gptq"]}) == 3
    assert ppl["qa_lora"] < ppl["gptq"]


def train_losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_default_start_is_the_measured_best_per_bit_width():
    """GPTQ-mse at 2 bits, the MSE search above (README, recipe study); GPTQ needs float offsets."""
    assert make_config("dl_qat", n_bits=2).resolved_init == "gptq-mse"
    assert make_config("dl_qat", n_bits=3).resolved_init == make_config("dl_qat", n_bits=4).resolved_init == "mse"
    assert make_config("dl_qat", n_bits=2, zero_point="int").resolved_init == "mse"
    assert make_config("dl_qat", n_bits=2, clip_mode="dynamic").resolved_init == "minmax"
    assert parse_train_args(["--preset", "paper", "--n_bits", "2"])[0].init == "minmax"
    assert parse_train_args(["--n_bits", "2"])[0].resolved_init == "gptq-mse"


def test_default_clip_mode_is_joint_at_2_bits_only():
    """Joint at 2 bits with float zero points (README, W2 section), learn-then-fix above; the phase-1 budget
    follows: the defaulted run puts every step in phase 2, an explicit phase 1 is refused naming the way back."""
    from dlqat.train_config import resolve_defaults

    assert make_config("dl_qat", n_bits=2).resolved_clip_mode == "joint"
    assert (
        make_config("dl_qat", n_bits=3).resolved_clip_mode
        == make_config("dl_qat", n_bits=4).resolved_clip_mode
        == "learn_then_fix"
    )
    assert make_config("dl_qat", n_bits=2, zero_point="int").resolved_clip_mode == "learn_then_fix"
    assert parse_train_args(["--preset", "dlqat-5", "--n_bits", "2"])[0].resolved_clip_mode == "learn_then_fix"
    method, _ = resolve_defaults(*parse_train_args(["--n_bits", "2", "--data", "x.txt"]))
    assert (method.phase1_steps, method.phase2_steps) == (0, 2000)
    assert [p.name for p in phases(method, ["layer"])] == ["phase2: lora_a/lora_b/magnitude/scale/offset"]
    with pytest.raises(ValueError, match=r"joint \(the default at 2 bits\).*--clip_mode learn_then_fix"):
        make_config("dl_qat", n_bits=2, phase1_steps=8)


def test_a_derived_config_gets_the_defaults_of_its_own_bit_width():
    """``dataclasses.replace(cfg, n_bits=2)`` (a bit sweep in a script) must not carry the 4-bit defaults
    over: unset settings stay unset and resolve at the new width, given ones stay given; the run record
    (``to_dict``) holds the resolved values."""
    from dataclasses import replace

    four = make_config("dl_qat", n_bits=4)
    two = replace(four, n_bits=2)
    assert (two.resolved_clip_mode, two.resolved_init) == ("joint", "gptq-mse")
    assert (four.resolved_clip_mode, four.resolved_init) == ("learn_then_fix", "mse")
    pinned = replace(make_config("dl_qat", n_bits=4, clip_mode="learn_then_fix", init="minmax"), n_bits=2)
    assert (pinned.resolved_clip_mode, pinned.resolved_init) == ("learn_then_fix", "minmax")
    assert {k: two.to_dict()[k] for k in ("clip_mode", "init")} == {"clip_mode": "joint", "init": "gptq-mse"}
    recorded = {k: v for k, v in two.to_dict().items() if k != "method"}
    assert make_config("dl_qat", **recorded) == replace(two, clip_mode="joint", init="gptq-mse")
    assert make_config("dl_qat", n_bits=2, phase1_steps=8, clip_mode="learn_then_fix").phase1_steps == 8


def test_compare_splits_dl_qat_steps_by_the_clip_mode_the_run_gets():
    assert steps_flags("dl_qat", [40], 3, []) == ["--phase1_steps", "8", "--phase2_steps", "32"]
    assert steps_flags("dl_qat", [40, 120], 2, []) == [
        "--phase1_steps", "0", "--phase2_steps", "120", "--eval_at", "40,120",
    ]  # fmt: skip
    for method, extra in [
        ("dl_qat", ["--clip_mode", "learn_then_fix"]),
        ("dl_qat:dlqat-5", []),
        ("dl_qat", ["--zero_point", "int"]),
    ]:
        assert steps_flags(method, [40], 2, extra)[:2] == ["--phase1_steps", "8"], (method, extra)
    assert steps_flags("dl_qat", [40], 3, ["--clip-mode", "joint"])[:2] == ["--phase1_steps", "0"]
    assert steps_flags("l4q", [40], 2, []) == ["--steps", "40"]


def test_a_teacher_with_another_vocabulary_is_refused(tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlqat.train import train
    from dlqat.train_config import TrainConfig

    other = tmp_path / "other-vocab"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<extra>"])
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
    tokenizer.save_pretrained(other)
    run = TrainConfig(model=str(tiny_model_dir), data=str(text_file), eval_data=str(text_file), seq_len=32,
                      eval_seq_len=32, output_dir=str(tmp_path / "run"), progress=False, loss="kd",
                      teacher=str(other))  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher='.*other-vocab': its tokenizer differs from the model's"):
        train(make_config("dl_qat", n_bits=3, group_size=32, rank=2, phase1_steps=1, phase2_steps=1), run)


def test_gptq_start_trains_and_reports_its_start(tiny_model_dir, text_file, tmp_path, capsys, caplog):
    from dlqat.train import train
    from dlqat.train_config import TrainConfig

    cfg = make_config("dl_qat", n_bits=3, group_size=32, rank=2, init="gptq", phase1_steps=2, phase2_steps=6, lr=1e-2)
    run = TrainConfig(model=str(tiny_model_dir), data=str(text_file), eval_data=str(text_file), seq_len=32,
                      eval_seq_len=32, output_dir=str(tmp_path / "run"), progress=False, loss="ce")  # fmt: skip
    ppl = train(cfg, run)["perplexity"]
    assert set(ppl) == {"float", "rtn", "gptq", "dl_qat"}
    assert ppl["dl_qat"] < ppl["gptq"]  # (a random tiny model: GPTQ vs RTN says nothing)
    # kd from a GPTQ start: the layers lost W0, so a float copy made before surgery teaches; it must teach
    # exactly what the same model given as --teacher does (same losses, step by step)
    copied, given = tmp_path / "kd-copy", tmp_path / "kd-given"
    with caplog.at_level(logging.INFO, logger="dlqat"):
        train(cfg, TrainConfig(**{**run.__dict__, "loss": "kd", "output_dir": str(copied)}))
    assert "the float weights are not kept, so a frozen copy of the model" in caplog.text
    train(cfg, TrainConfig(**{**run.__dict__, "loss": "kd", "teacher": str(tiny_model_dir), "output_dir": str(given)}))
    assert train_losses(copied) == train_losses(given) and len(train_losses(copied)) == 8
    with pytest.raises(ValueError, match="init='gptq' with zero_point='int'"):
        make_config("dl_qat", init="gptq", zero_point="int")
    with pytest.raises(ValueError, match="init='gptq-mse' with zero_point='int'"):
        make_config("l4q", init="gptq-mse", zero_point="int")
    with pytest.raises(ValueError, match="grid='mean': expected one of minmax, mse"):
        make_config("gptq", grid="mean")


def test_compare_grows_a_finished_curve_to_a_longer_budget(tiny_model_dir, text_file, tmp_path, capsys):
    """--steps 2,4 then 2,4,6 on the same folder: the finished 4-step runs continue to 6 steps from their
    checkpoints (their 2- and 4-step points kept), a per-budget method's 4-step run keeps its point under its
    ``-4steps`` name; a shorter --steps, or a cosine run that finished short, is refused, naming the folder."""
    out = tmp_path / "grow"
    common = ["--bits", "3", "--group_size", "32", "--output_dir", str(out), "--model", str(tiny_model_dir), "--data",
              str(text_file), "--eval_data", str(text_file), "--seq_len", "32", "--grad_accum", "1", "--eval_seq_len",
              "32", "--eval_max_windows", "2", "--no_progress"]  # fmt: skip
    assert main(["compare", "--methods", "l4q,lora_rtn", "--steps", "2,4", *common]) == 0
    curve_file, lora_dir = out / "l4q-w3g32" / "curve.jsonl", out / "lora_rtn-w3g32"
    before, lora_at_4 = curve_file.read_text(), (lora_dir / "results.json").read_text()
    assert main(["compare", "--methods", "l4q,lora_rtn", "--steps", "2,4,6", *common]) == 0
    assert curve_file.read_text().startswith(before)
    assert [json.loads(line)["step"] for line in curve_file.read_text().splitlines()] == [2, 4, 6]
    log = (out / "l4q-w3g32" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 7))
    assert json.loads((out / "l4q-w3g32" / "results.json").read_text())["settings"]["steps"] == 6
    assert (out / "lora_rtn-w3g32-4steps" / "results.json").read_text() == lora_at_4
    assert json.loads((lora_dir / "results.json").read_text())["settings"]["steps"] == 6
    assert "| l4q | 3 | 32 |" in (out / "curves.md").read_text()
    capsys.readouterr()
    assert main(["compare", "--methods", "l4q", "--steps", "2,4", *common]) == 2
    assert f"{out / 'l4q-w3g32'} holds a 6-step l4q run, more than --steps asks for (4)" in capsys.readouterr().err
    cosine = tmp_path / "cos"
    cosine_argv = ["compare", "--methods", "l4q", *common, "--output_dir", str(cosine), "--lr_schedule", "cosine"]
    assert main([*cosine_argv, "--steps", "2"]) == 0
    assert main([*cosine_argv, "--steps", "4"]) == 2
    assert f"{cosine / 'l4q-w3g32'} holds a 2-step l4q run with lr_schedule='cosine'" in capsys.readouterr().err
