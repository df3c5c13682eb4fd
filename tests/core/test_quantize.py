"""Quantization methods, the packed on-disk format, and a whole run (goal, selection, save) with bad input."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from ryzanstein.engine.generate import generate_text
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.qweights import cpu_supports_kernel, dequantize, int4_params, unpack_int4
from ryzanstein.errors import Cancelled, InvalidRequest, ModelNotFound, RyzansteinError
from ryzanstein.models.estimate import count_parameters
from ryzanstein.models.loader import load_model_folder
from ryzanstein.models.store import ModelStore
from ryzanstein.quant.evaluate import calibration_text, chunk_logits, evaluate, heldout_text, token_chunks
from ryzanstein.quant.io import save_quantized
from ryzanstein.quant.methods import apply_method, gptq, known_methods, parse_method
from ryzanstein.quant.run import GoalNotMet, QuantizeRequest, run_quantization

pytestmark = pytest.mark.skipif(not cpu_supports_kernel(), reason="needs AVX2 + FMA")
KL_BOUND = {"int8": 0.01, "int4-g32": 0.3, "int4-g64": 0.3, "gptq-g32": 0.3, "awq-g32": 0.3, "mixed-g32": 0.3}


def eval_data(folder: Path, max_tokens: int) -> tuple:
    """(held-out chunks, calibration chunks, fp32 reference logits) for a model folder."""
    lm = load_model_folder("reference", folder)
    chunks = token_chunks(lm.tokenizer, heldout_text(), 256, max_tokens)
    return chunks, token_chunks(lm.tokenizer, calibration_text(), 256), chunk_logits(lm.model, chunks)


@pytest.fixture(scope="module")
def data(tiny_llama_dir):
    return eval_data(tiny_llama_dir, 768)


def test_method_names():
    assert parse_method("int4-g64") == ("int4", 64) and parse_method("int8") == ("int8", None)
    for bad in ("int3", "int4", "int4-g48", "int8-g32", "gptq", "awq-gx", "mixed", ""):
        with pytest.raises(InvalidRequest, match="Unknown quantization method"):
            parse_method(bad)
    assert "gptq-g64" in known_methods() and "bitnet" in known_methods()


@pytest.mark.parametrize("method", sorted(KL_BOUND))
def test_method_stays_close_and_survives_save_and_reload(method, tiny_llama_dir, data, tmp_path):
    chunks, calib, reference = data
    lm = load_model_folder("tiny", tiny_llama_dir)
    recipe = apply_method(lm.model, method, calib)
    accuracy = evaluate(lm.model, chunks, reference)
    assert accuracy.mean_kl < KL_BOUND[method], accuracy
    prompt = lm.tokenizer.encode("Quantized models must still speak")
    before = generate_text(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=12))[0]
    out = tmp_path / "q"
    out.mkdir()
    save_quantized(lm.model, tiny_llama_dir, out, recipe, {"method": method})
    assert (out / "model.safetensors").stat().st_size < (tiny_llama_dir / "model.safetensors").stat().st_size
    # the quantized copy reports its base's parameter count (it once said 163.0 M for a 134.5 M model)
    assert count_parameters(out)[0] == count_parameters(tiny_llama_dir)[0]
    again = load_model_folder("q", out)
    assert generate_text(again.model, again.tokenizer, prompt, GenerationParams(max_tokens=12))[0] == before
    names = dict(again.model.named_modules())
    for name in recipe:
        assert torch.equal(dequantize(names[name]), dequantize(dict(lm.model.named_modules())[name]))


def test_the_estimate_counts_what_the_native_tiles_add(tiny_llama_dir, tmp_path):
    """The native path holds int4/int8 codes as tiles (the store-layout copy is released) with their scales
    copied: the estimate adds exactly those copies, so the budget covers what an attached model holds."""
    from ryzanstein.engine import native
    from ryzanstein.models.estimate import estimate_memory

    lm = load_model_folder("tiny", tiny_llama_dir)
    recipe = apply_method(lm.model, "int4-g32")
    save_quantized(lm.model, tiny_llama_dir, tmp_path, recipe, {"method": "int4-g32"})
    quantized = [m for m in lm.model.modules() if hasattr(m, "weight_int4") or hasattr(m, "weight_int8")]
    assert quantized and all(m.out_features % 16 == 0 for m in quantized)  # no padded tile: sizes match exactly
    codes = sum((m.weight_int4 if hasattr(m, "weight_int4") else m.weight_int8).numel() for m in quantized)
    estimate = estimate_memory(tmp_path, 1024)
    try:
        added = sum(native.weight_tiles(m).numel() for m in quantized) - codes
    except native.NativeUnsupported:  # no compiler here: the tiles' layout by its formula
        added = sum(m.weight_scale.numel() * 4 for m in quantized)  # int4: fp16 scale + min; int8: fp32 scale
    assert estimate.native_bytes == added > 0
    assert estimate.load_bytes == estimate.weights_bytes + estimate.overhead_bytes + added


def test_bitnet_is_ternary_and_measurably_worse(tiny_llama_dir, data):
    chunks, calib, reference = data
    lm = load_model_folder("tiny", tiny_llama_dir)
    recipe = apply_method(lm.model, "bitnet", calib)
    layer = lm.model.model.layers[0].mlp.up_proj
    assert recipe["model.layers.0.mlp.up_proj"]["ternary"]
    assert set(unpack_int4(layer.weight_int4).unique().tolist()) <= {0, 1, 2}  # packed, not fp32 in disguise
    values = dequantize(layer)
    gamma = layer.weight_scale[:, :1]
    assert torch.allclose(values.abs(), torch.where(values == 0, 0, gamma.expand_as(values)), atol=1e-6)
    assert evaluate(lm.model, chunks, reference).top1_agreement < 0.8  # a random model's KL stays small


def test_gptq_beats_round_to_nearest_on_its_calibration_inputs():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=g)
    x = torch.randn(2048, 64, generator=g) @ mixing  # correlated inputs, as in a real layer
    w = torch.randn(32, 64, generator=g)
    hessian = 2 * x.T @ x / x.shape[0]
    codes, scale, low = gptq(w, hessian, 32)
    gptq_w = (codes.float().reshape(32, -1, 32) * scale[..., None] + low[..., None]).reshape(32, 64)
    s, m = int4_params(w, 32)
    rtn = (torch.round((w.reshape(32, -1, 32) - m[..., None]) / s[..., None]).clamp(0, 15) * s[..., None]
           + m[..., None]).reshape(32, 64)
    assert codes.max() <= 15
    assert ((gptq_w - w) @ x.T).norm() < 0.8 * ((rtn - w) @ x.T).norm()


def test_awq_scaling_lowers_the_output_error_of_round_to_nearest():
    from ryzanstein.engine.qweights import quantize_weight_int4
    from ryzanstein.quant.methods import awq_scale, output_error

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 64, generator=g) * torch.linspace(0.05, 8.0, 64)  # a few loud input channels
    w = torch.randn(48, 64, generator=g)
    hessian = 2 * x.T @ x / x.shape[0]

    def effective(weight_scaled: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        packed, scale, low = quantize_weight_int4(weight_scaled, 32)
        codes = unpack_int4(packed).float().reshape(48, -1, 32)
        return (codes * scale[..., None] + low[..., None]).reshape(48, 64) / s

    s = awq_scale(w, hessian, x.abs().mean(0), 32)
    plain = output_error(effective(w, torch.ones(64)) - w, hessian)
    assert output_error(effective(w * s, s) - w, hessian) < 0.9 * plain


def test_mixed_precision_keeps_sensitive_layers_at_int8(tiny_llama_dir, data):
    _, calib, _ = data
    lm = load_model_folder("tiny", tiny_llama_dir)
    recipe = apply_method(lm.model, "mixed-g32", calib)
    formats = [spec["format"] for spec in recipe.values()]
    assert "int8" in formats and "int4" in formats
    kept = [name for name, spec in recipe.items() if spec["format"] == "int8" and name != "lm_head"]
    assert len(kept) == max(1, int(0.25 * (len(recipe) - 1)))  # the most sensitive quarter (2 blocks: no ends)


@pytest.fixture
def qstore(tmp_path, tiny_llama_dir):
    s = ModelStore(tmp_path / "models")
    s.import_hf_folder(tiny_llama_dir, "tiny")
    return s


def request(**kw) -> QuantizeRequest:
    return QuantizeRequest(**{"model": "tiny", "methods": ["int8", "int4-g32"], "eval_tokens": 600,
                              "speed_tokens": 4, **kw})


def test_run_measures_every_candidate_picks_for_the_goal_and_saves(qstore):
    report = run_quantization(qstore, request(max_loss_pct=1000))
    assert [r["method"] for r in report["rows"]] == ["none", "int8", "int4-g32"]
    assert report["selected"] == "int4-g32"  # smallest within the (generous) bound
    assert report["saved_as"] == "tiny-int4-g32" and qstore.has("tiny-int4-g32")
    for row in report["rows"][1:]:
        assert row["memory_bytes"] < report["rows"][0]["memory_bytes"]
        assert 0 <= row["top1_agreement"] <= 1 and row["mean_kl"] >= 0
    kv = {row["kv_cache"]: row for row in report["kv_cache"]}
    assert kv["int8"]["bytes_per_token"] < kv["fp32"]["bytes_per_token"] / 2  # head_dim 16: scales weigh
    assert kv["int4"]["bytes_per_token"] < kv["int8"]["bytes_per_token"]
    assert kv["fp16"]["bytes_per_token"] * 2 == kv["fp32"]["bytes_per_token"]
    assert kv["fp32"]["mean_kl"] == 0
    assert -1e-6 <= kv["fp16"]["mean_kl"] <= kv["int8"]["mean_kl"] <= kv["int4"]["mean_kl"]
    saved = load_model_folder("saved", Path(qstore.get("tiny-int4-g32").path))
    assert generate_text(saved.model, saved.tokenizer, [5, 6, 7], GenerationParams(max_tokens=5))[2].completion_tokens


def test_fits_goal_and_a_goal_nobody_meets(qstore):
    report = run_quantization(qstore, request(goal="fits", max_gb=1.0, save=False))
    best = min(report["rows"], key=lambda r: r["perplexity"])  # all fit in 1 GB: the most accurate wins
    assert report["selected"] == best["method"] and report["saved_as"] is None
    names = [m.name for m in qstore.list()]
    with pytest.raises(GoalNotMet, match="Closest: int4-g32"):
        run_quantization(qstore, request(goal="fits", max_gb=0.005))  # possible in principle, not with these
    assert [m.name for m in qstore.list()] == names


def test_bad_requests_leave_the_store_as_it_was(qstore, tmp_path, monkeypatch):
    names = [m.name for m in qstore.list()]
    with pytest.raises(ModelNotFound):
        run_quantization(qstore, request(model="nope"))
    with pytest.raises(InvalidRequest, match="Unknown quantization method"):
        run_quantization(qstore, request(methods=["int5"]))
    with pytest.raises(InvalidRequest, match="empty"):
        run_quantization(qstore, request(calibration="   "))
    with pytest.raises(InvalidRequest, match="at least 256"):
        run_quantization(qstore, request(methods=["gptq-g32"], calibration="far too short"))
    with pytest.raises(InvalidRequest, match="at least 256 held-out tokens") as few:
        run_quantization(qstore, request(eval_tokens=100))
    assert few.value.param == "eval_tokens"
    with pytest.raises(InvalidRequest, match="already in the store"):
        run_quantization(qstore, request(name="tiny"))
    with pytest.raises(InvalidRequest, match="not a multiple of 128"):
        run_quantization(qstore, request(methods=["int4-g128"]))
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        run_quantization(qstore, request(max_loss_pct=1000), cancel=cancel,
                         progress=lambda stage, f: cancel.set() if stage.startswith("int8") else None)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ryzanstein.quant.run.save_quantized", crash)
    with pytest.raises(RyzansteinError, match="disk full") as failed:
        run_quantization(qstore, request(max_loss_pct=1000))
    assert failed.value.result["rows"][0]["method"] == "none"  # the measured table is kept
    assert [m.name for m in qstore.list()] == names
    assert not [p for p in qstore.root.iterdir() if p.name.startswith(".")]


def test_default_model_int4_g32_stays_within_one_percent(default_model_dir, tmp_path):
    """The default model was shipped as Q4_1 (groups of 32): int4-g32 reproduces its weights almost exactly."""
    store = ModelStore(tmp_path / "models")
    shutil.copytree(default_model_dir, store.root / "smol")
    report = run_quantization(store, QuantizeRequest(model="smol", methods=["int4-g32", "int8"], eval_tokens=1024,
                                                     speed_tokens=8))
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["int4-g32"]["perplexity_change_pct"] < 1.0 and rows["int8"]["perplexity_change_pct"] < 1.0
    assert report["selected"] == "int4-g32" and store.has("smol-int4-g32")
    for method in ("int4-g32", "int8"):
        assert rows[method]["decode_tokens_per_s"] > 0


@pytest.fixture(scope="module")
def default_eval(default_model_dir):
    return eval_data(default_model_dir, 512)


@pytest.mark.parametrize("method,kl_bound", [("gptq-g64", 0.4), ("awq-g64", 0.25), ("mixed-g64", 0.2),
                                              ("bitnet", None)])
def test_each_method_on_the_default_model_reloads_and_generates(method, kl_bound, default_model_dir, default_eval,
                                                                tmp_path):
    chunks, calib, reference = default_eval
    lm = load_model_folder("smol", default_model_dir)
    recipe = apply_method(lm.model, method, calib)
    accuracy = evaluate(lm.model, chunks, reference)
    if kl_bound is None:  # BitNet after training: measured, and it is a wreck
        assert accuracy.top1_agreement < 0.2
    else:
        assert accuracy.mean_kl < kl_bound, accuracy
    prompt = lm.tokenizer.encode("The capital of France is")
    before = generate_text(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=8))[0]
    out = tmp_path / "q"
    out.mkdir()
    save_quantized(lm.model, default_model_dir, out, recipe, {"method": method})
    again = load_model_folder("again", out)
    assert generate_text(again.model, again.tokenizer, prompt, GenerationParams(max_tokens=8))[0] == before


def test_a_taken_default_name_gets_a_number_instead_of_failing_at_the_end(qstore):
    first = run_quantization(qstore, request(methods=["int8"], max_loss_pct=1000))
    second = run_quantization(qstore, request(methods=["int8"], max_loss_pct=1000))
    assert (first["saved_as"], second["saved_as"]) == ("tiny-int8", "tiny-int8-2")
    assert qstore.has("tiny-int8") and qstore.has("tiny-int8-2")


def test_a_failed_run_keeps_its_measured_table(qstore, monkeypatch):
    import ryzanstein.quant.run as run_module

    real_apply = run_module.apply_method

    def broken_for_int4(model, method, *args, **kwargs):
        if method.startswith("int4"):
            raise RuntimeError("simulated failure while quantizing")
        return real_apply(model, method, *args, **kwargs)

    monkeypatch.setattr(run_module, "apply_method", broken_for_int4)
    with pytest.raises(RyzansteinError) as failed:
        run_quantization(qstore, request(max_loss_pct=1000))
    assert "simulated failure" in failed.value.message
    assert [r["method"] for r in failed.value.result["rows"]] == ["none", "int8"]
    assert not qstore.has("tiny-int4-g32")
    # a failure while saving keeps the table too: test_bad_requests_leave_the_store_as_it_was


def test_stages_name_the_base_evaluation_and_a_first_kernel_build(qstore, monkeypatch):
    import ryzanstein.quant.run as run_module

    built = []
    monkeypatch.setattr(run_module, "kernel_needs_build", lambda: True)
    monkeypatch.setattr(run_module, "kernel", lambda: built.append(True))
    stages: list[tuple[str, float]] = []
    run_quantization(qstore, request(methods=["int8"], max_loss_pct=1000, save=False),
                     progress=lambda stage, f: stages.append((stage, f)))
    names = [s for s, _ in stages]
    assert names[0] == "evaluating the unquantized model: loading"
    assert any(s.startswith("evaluating the unquantized model: reference logits 1/") for s in names)
    assert any(s.startswith("evaluating the unquantized model: perplexity") for s in names)
    assert "compiling kernels (first use, about 2 min)" in names and built == [True]
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions)  # the bar never goes backwards


def test_cli_help_lists_every_method():
    from ryzanstein.cli import METHOD_NAMES

    assert METHOD_NAMES.split(", ") == known_methods()


def test_sensitivity_replay_starts_at_the_changed_block_with_the_same_logits(tiny_llama_dir, data, monkeypatch):
    """The mixed-precision ranking re-runs the model ~200 times; each run starts at the block of the linear it
    changed, the earlier blocks giving back their recorded outputs. Its logits must be a full pass's, bit for
    bit, from every block, with a linear changed, and the ranking the same as with full passes."""
    from ryzanstein.quant import methods

    lm = load_model_folder("replay", tiny_llama_dir)
    chunk = data[1][0][:, :64]
    with torch.inference_mode():
        replay = methods._BlockReplay(lm.model, chunk)
        assert replay.usable and len(replay.blocks) == lm.model.config.num_hidden_layers
        for start in range(len(replay.blocks) + 1):
            assert torch.equal(replay.logits_from(start), replay.reference)
        name = next(n for n in methods.linears(lm.model) if ".layers.1." in n and "down_proj" in n)
        module = dict(lm.model.named_modules())[name]
        original = module.weight.data
        module.weight.data = original * 0.5
        try:
            assert replay.block_of(name) == 1
            full = lm.model(input_ids=chunk).logits[0].float()
            assert torch.equal(replay.logits_from(1), full) and not torch.equal(full, replay.reference)
        finally:
            module.weight.data = original
        assert all("forward" not in vars(b) for b in replay.blocks)  # every block's own forward is back

    def progress(*_args):
        return None

    kept = methods.sensitive_layers(lm.model, [chunk], 32, progress, None)
    full_passes = methods._BlockReplay.__init__

    def without_replay(self, model, chunk):
        full_passes(self, model, chunk)
        self.usable = False

    monkeypatch.setattr(methods._BlockReplay, "__init__", without_replay)
    assert methods.sensitive_layers(lm.model, [chunk], 32, progress, None) == kept
