"""The native decode path against the transformers reference: per architecture, per layer, per step, on every
instruction-set path this CPU runs; quantized weights against an independent torch emulation of the same
integer arithmetic; fallbacks and bad input."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ryzanstein.engine import native, qweights
from ryzanstein.engine.runner import BatchRunner, build_rows
from ryzanstein.errors import InvalidRequest
from ryzanstein.models.architectures import GQA, Architecture, by_model_type, tiny_config

SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3)
NATIVE_ARCHITECTURES = {
    "llama": by_model_type("llama"),
    "mistral": Architecture("Mistral", "mistral", dict(GQA, sliding_window=None)),
    "qwen2": by_model_type("qwen2"),
    "qwen3": by_model_type("qwen3"),
    "phi3": by_model_type("phi3"),
    "granite": Architecture("Granite", "granite", dict(GQA, embedding_multiplier=2.0, residual_multiplier=0.5,
                                                      attention_multiplier=0.2, logits_scaling=3.0)),
}
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in native.available_isas(),
                                                   reason=f"this CPU does not run {isa}"))
        for isa in native.ISA_LEVELS]
IDS = list(range(5, 45))


def tiny(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    arch = NATIVE_ARCHITECTURES[model_type]
    config = tiny_config(Architecture(arch.family, arch.model_type, {**arch.config, **SMALL, **overrides}))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if model_type == "qwen2":  # random models start with zero biases: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    return model


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, request.param)
    return request.param


def engine_logits(model, ids: list[int], chunk: int = 16) -> tuple[torch.Tensor, BatchRunner]:
    """Logits of every position: prefill chunks of `chunk` rows, then the last 4 tokens as decode rows."""
    runner = BatchRunner(model, Path(tempfile.gettempdir()))
    kv = runner.cache("a")
    kv.reserve(len(ids))
    out, prefix = [], len(ids) - 4
    for start in range(0, prefix, chunk):
        part = ids[start:min(start + chunk, prefix)]
        out.append(runner.forward(build_rows([(kv, part, start, False, "all")]), "prefill"))
    for i in range(prefix, len(ids)):
        out.append(runner.forward(build_rows([(kv, [ids[i]], i, True, "all")]), "decode"))
    return torch.cat(out), runner


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


# -- fp32 weights: the native step is the transformers model ---------------------------------------------
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("model_type", list(NATIVE_ARCHITECTURES))
def test_native_step_equals_transformers_for_each_architecture(model_type, isa):
    model = tiny(model_type)
    got, runner = engine_logits(model, IDS)
    try:
        assert runner.native is not None and runner.native.isa == isa
        torch.testing.assert_close(got, reference_logits(model, IDS), atol=2e-5, rtol=1e-4)
    finally:
        runner.close()


@pytest.mark.parametrize("model_type", ["llama", "granite"])  # granite: logits divided in the head's jobs
def test_the_steps_greedy_choices_are_torch_argmax_of_its_logits(model_type):
    model = tiny(model_type)
    runner = BatchRunner(model, Path(tempfile.gettempdir()))
    try:
        items = []
        for i in range(5):
            kv = runner.cache(f"s{i}")
            kv.reserve(16)
            items.append((kv, IDS[i:i + 6], 0, False, "all"))
        logits = runner.forward(build_rows(items), "prefill")
        assert runner.native is not None and logits.shape[0] == 30
        assert runner.greedy_choices(logits) == logits.argmax(dim=-1).tolist()
        assert runner.native.choices_for(logits.clone()) is None  # only the step's own logits have them
    finally:
        runner.close()


def test_head_choices_pick_what_torch_argmax_picks_whatever_the_chunks():
    """Ties (the first wins, across chunk borders too), NaN (counts as the largest; the first one), infinities."""
    torch.manual_seed(0)
    x = torch.randn(9, 50)
    x[1] = 0.5  # all equal
    x[2, 7] = x[2, 31] = 9.0  # a tie across chunks
    x[3, 40] = float("nan")
    x[4, 3] = x[4, 44] = float("nan")
    x[4, 0] = 100.0
    x[5] = float("-inf")
    x[6, 20] = float("inf")
    x[7, 49] = 50.0  # the tail past the last full vector of 8
    x[8, 48] = float("nan")
    for chunk in (1, 3, 8, 17, 49, 1000):
        assert native.library().head_choices(x, chunk).tolist() == x.argmax(dim=-1).tolist(), chunk


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 96, 128])
def test_attention_equals_transformers_for_each_head_size(head_dim, isa):
    """Head sizes take different attention code (registers for 2-8 vectors of the ISA's width, one key at a
    time otherwise); GQA groups of 3 heads share their keys. Prompts longer than 4 keys, of every length mod 4."""
    model = tiny("llama", hidden_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=head_dim,
                 num_hidden_layers=2)
    ids = IDS[:23]
    got, runner = engine_logits(model, ids, chunk=7)
    try:
        assert runner.native is not None and runner.native.isa == isa
        torch.testing.assert_close(got, reference_logits(model, ids), atol=2e-5, rtol=1e-4)
    finally:
        runner.close()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("head_dim", [48, 64, 128])
def test_an_fp16_cache_is_written_and_read_as_the_reference_path_does(head_dim, isa):
    """kv_cache="fp16": the native step rounds keys/values to fp16 as torch does (the two caches agree to the
    last fp16 bit, where the fp32 keys themselves differ in their last bits) and reads them widened, as the
    reference path reads the same cache (48: the any-size code)."""
    model = tiny("llama", hidden_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=head_dim,
                 num_hidden_layers=2)
    model.ryzanstein_kv_cache = "fp16"
    ids = IDS[:23]
    got, runner = engine_logits(model, ids, chunk=7)
    path, model.ryzanstein_decode_path = getattr(model, "ryzanstein_decode_path", "auto"), "reference"
    try:
        expected, reference = engine_logits(model, ids, chunk=7)
    finally:
        model.ryzanstein_decode_path = path
    try:
        assert runner.native is not None and runner.native.isa == isa and reference.native is None
        ours, theirs = runner.cache("a"), reference.cache("a")
        for layer in range(2):
            for field in ("k", "v"):
                assert ours.layers[layer][field].dtype == torch.float16
                torch.testing.assert_close(ours.layers[layer][field][:len(ids)].float(),
                                           theirs.layers[layer][field][:len(ids)].float(), atol=1e-6, rtol=2**-10)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        # and the rounding is small next to the fp32 cache's answer
        torch.testing.assert_close(got, reference_logits(model, ids), atol=5e-3, rtol=5e-3)
    finally:
        runner.close()
        reference.close()


def test_native_step_equals_transformers_layer_by_layer():
    """The same weights cut after 1, 2 and 3 layers: each prefix of the model agrees, so a wrong layer is
    found where it is."""
    full = tiny("llama", num_hidden_layers=3)
    for layers in (1, 2, 3):
        cut = copy.deepcopy(full)
        cut.model.layers = cut.model.layers[:layers]
        cut.config.num_hidden_layers = layers
        got, runner = engine_logits(cut, IDS[:12])
        runner.close()
        torch.testing.assert_close(got, reference_logits(cut, IDS[:12]), atol=2e-5, rtol=1e-4)


def test_native_rope_scaling_follows_the_models_frequencies():
    from ryzanstein.engine.long_context import LongContext, apply_long_context

    for rope in ("yarn", "linear", "ntk"):
        model = tiny("llama", max_position_embeddings=64)
        applied = apply_long_context(model, LongContext(context_tokens=256, rope=rope), 256)
        assert applied["rope_factor"] == 4
        check_rope(model)


def check_rope(model) -> None:
    ids = [5 + (i * 7) % 30 for i in range(100)]  # beyond the native 64 positions
    got, runner = engine_logits(model, ids, chunk=32)
    runner.close()
    torch.testing.assert_close(got, reference_logits(model, ids), atol=5e-5, rtol=1e-4)


# -- quantized weights: the same integer arithmetic, emulated in torch -------------------------------------
def quantize(model, method: str) -> None:
    if method == "int8":
        qweights.quantize_model_int8(model)
        return
    group = int(method.split("-g")[1])
    shared = qweights.shared_parameters(model)
    for module in list(model.modules()):
        if type(module) is torch.nn.Linear and not qweights.is_quantized(module):
            if module is model.get_output_embeddings():
                q, scale = qweights.quantize_weight(module.weight)
                qweights.set_int8(module, q, scale, shared)
            else:
                qweights.set_int4(module, *qweights.quantize_weight_int4(module.weight, group), group, shared)
    qweights.mark_head(model)


def emulated_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """y as native_step.cpp defines it: x quantized per block of 32 (scale amax/127, round half to even), exact
    integer block sums, times the activation and weight scales; int4 adds min · (sum of the quantized x per
    group), so the result is w · x̂ exactly."""
    qweights.store_layout(module)  # the codes in the store's layout (the native path may hold only tiles)
    flat = x.reshape(-1, x.shape[-1]).float()
    blocks = flat.reshape(flat.shape[0], -1, 32)
    d32 = blocks.abs().amax(-1) / 127  # in float32, as the kernel does: codes must match exactly
    inverse = torch.where(d32 > 0, 1.0 / d32, torch.zeros_like(d32))
    q = torch.round(blocks * inverse[..., None]).double()
    d, flat = d32.double(), flat.double()
    if hasattr(module, "weight_int8"):
        w = module.weight_int8.double().reshape(module.out_features, -1, 32)
        y = (torch.einsum("nbk,obk->nob", q, w) * d[:, None, :]).sum(-1) * module.weight_scale.double()
    else:
        group = module.int4_group
        codes = qweights.unpack_int4(module.weight_int4).double().reshape(module.out_features, -1, 32)
        per = group // 32
        scale = module.weight_scale.half().double().repeat_interleave(per, dim=1)  # the kernel reads fp16
        y = (torch.einsum("nbk,obk->nob", q, codes) * d[:, None, :] * scale[None]).sum(-1)
        quantized = (q * d[..., None]).reshape(flat.shape[0], -1)  # x̂
        sums = quantized.reshape(flat.shape[0], -1, group).sum(-1)
        y = y + sums @ module.weight_min.half().double().T
    if module.bias is not None:
        y = y + module.bias.double()
    return y.float().reshape(*x.shape[:-1], module.out_features)


def emulated(model):
    """A copy whose quantized linears compute with the emulation (transformers runs everything else)."""
    import types

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if qweights.is_quantized(module):
            module.forward = types.MethodType(emulated_linear, module)
    return twin


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("method", ["int8", "int4-g32", "int4-g64"])
def test_native_linears_compute_exactly_the_integer_arithmetic(method, isa):
    model = tiny("qwen2")
    quantize(model, method)
    decoder = native.NativeDecoder(model)
    assert decoder.isa == isa
    x = torch.randn(7, 256) * torch.linspace(0.1, 3, 256)  # uneven blocks
    for module in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.down_proj, model.lm_head):
        spec = native.linear_spec(module)
        torch.testing.assert_close(decoder.impl.linear_forward(spec, x[:, :module.in_features]),
                                   emulated_linear(module, x[:, :module.in_features]), atol=1e-5, rtol=1e-5)


def quantized_linear(outputs: int, inputs: int, group: int, seed: int) -> torch.nn.Linear:
    """int4 with groups of `group`, or int8 per channel for group 0."""
    torch.manual_seed(seed)
    module = torch.nn.Linear(inputs, outputs, bias=True)
    with torch.no_grad():
        module.bias.normal_()
    if group:
        qweights.set_int4(module, *qweights.quantize_weight_int4(module.weight, group), group, set())
    else:
        qweights.set_int8(module, *qweights.quantize_weight(module.weight), set())
    return module


def test_weight_tiles_hold_every_output_and_every_isa_gives_the_same_bits():
    """Tiles of 16 outputs: linears whose outputs are no multiple of 16 (the last tile padded), int8 and int4 with
    groups of 32 to 128, 1 to 11 rows (one and more passes of 8): each output equals the integer arithmetic, and
    since vector lanes are outputs (no lane sums), AVX2, AVX-VNNI and AVX-512 agree to the last bit."""
    decoder = native.NativeDecoder(tiny("llama"))
    for outputs, inputs, group in [(37, 256, 32), (16, 128, 64), (50, 384, 128), (1, 64, 32), (37, 256, 0),
                                   (3, 96, 0), (64, 128, 0)]:
        module = quantized_linear(outputs, inputs, group, seed=outputs + group)
        tiles = native.weight_tiles(module)
        per_tile = inputs // group * 64 + inputs // 32 * 256 if group else 64 + inputs // 32 * 512
        assert tiles.shape == ((outputs + 15) // 16, per_tile)
        spec = native.linear_spec(module)
        for rows in (1, 3, 8, 11):
            x = torch.randn(rows, inputs) * torch.linspace(0.1, 3, inputs)
            expected = emulated_linear(module, x)
            results = []
            for isa in native.available_isas():
                decoder.impl.set_isa(native.ISA_LEVELS[isa])
                results.append(decoder.impl.linear_forward(spec, x))
                torch.testing.assert_close(results[-1], expected, atol=1e-5, rtol=1e-5)
            assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("group", [0, 32])
def test_weight_tiles_are_made_once_and_remade_when_the_weights_change(group):
    decoder = native.NativeDecoder(tiny("llama"))
    module = quantized_linear(32, 64, group, seed=1)
    first = native.weight_tiles(module)
    assert native.weight_tiles(module) is first  # cached
    x = torch.randn(2, 64)
    before = decoder.impl.linear_forward(native.linear_spec(module), x)
    packed = module.weight_int4 if group else module.weight_int8
    with torch.no_grad():
        packed.copy_(packed.flip(0))  # in place: a new version, the same storage
    assert native.weight_tiles(module) is not first
    after = decoder.impl.linear_forward(native.linear_spec(module), x)
    torch.testing.assert_close(after, emulated_linear(module, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("method", ["int8", "int4-g64"])
def test_attached_weights_live_once_and_come_back_exactly_when_needed(method):
    """Once the decoder attaches, the store-layout codes are released (the tiles hold them: a 7B int4 model must
    not take twice its size); the transformers path, saving and dequantizing get them back bit for bit, and the
    native step goes on reading the same tiles."""
    from ryzanstein.quant.io import quantized_state

    model = tiny("llama")
    quantize(model, method)
    quantized = [m for m in model.modules() if qweights.is_quantized(m)]

    def codes(m):
        return m.weight_int4 if hasattr(m, "weight_int4") else m.weight_int8

    before = {id(m): codes(m).clone() for m in quantized}
    sizes = {id(m): qweights.linear_bytes(m) for m in quantized}
    expected = reference_logits(model, IDS[:10])
    got, runner = engine_logits(model, IDS[:10])
    try:
        assert all(codes(m).numel() == 0 for m in quantized)  # released: the tiles hold the codes
        assert all(qweights.linear_bytes(m) == sizes[id(m)] for m in quantized)
        tiles = {id(m): native.weight_tiles(m).data_ptr() for m in quantized}
        torch.testing.assert_close(reference_logits(model, IDS[:10]), expected, atol=0, rtol=0)  # rebuilt exactly
        assert all(torch.equal(codes(m), before[id(m)]) for m in quantized)
        state = quantized_state(model)
        head = model.get_output_embeddings()
        assert torch.equal(state["lm_head.weight_int8"], before[id(head)])  # the head is int8 in both recipes
        down, kind = model.model.layers[0].mlp.down_proj, "weight_int8" if method == "int8" else "weight_int4"
        assert torch.equal(state[f"model.layers.0.mlp.down_proj.{kind}"], before[id(down)])
        assert {id(m): native.weight_tiles(m).data_ptr() for m in quantized} == tiles  # nothing remade
        kv = runner.cache("again")
        kv.reserve(16)
        again = runner.forward(build_rows([(kv, IDS[:10], 0, False, "all")]), "prefill")
        assert torch.equal(again, got[:10])  # the step still reads the same tiles, after the restore too
    finally:
        runner.close()


def test_weights_quantized_again_after_the_release_get_new_tiles():
    model = tiny("llama")
    quantize(model, "int4-g32")
    native.NativeDecoder(model)  # tiles made, store layout released
    down = model.model.layers[0].mlp.down_proj
    old = native.weight_tiles(down)
    with torch.no_grad():
        weight = torch.randn(down.out_features, down.in_features)
    qweights.set_int4(down, *qweights.quantize_weight_int4(weight, 32), 32, set())
    fresh = native.weight_tiles(down)
    assert fresh is not old and not torch.equal(fresh, old)
    x = torch.randn(3, down.in_features)
    decoder = native.NativeDecoder(model)
    torch.testing.assert_close(decoder.impl.linear_forward(native.linear_spec(down), x), emulated_linear(down, x),
                               atol=1e-5, rtol=1e-5)


def test_bad_weight_tiles_are_refused_clearly():
    decoder = native.NativeDecoder(tiny("llama"))
    module = quantized_linear(32, 64, 32, seed=2)
    kind, group, tiles, *rest = native.linear_spec(module)
    with pytest.raises(RuntimeError, match="weight tiles do not match their shape"):
        decoder.impl.linear_forward((kind, group, tiles[:1], *rest), torch.randn(1, 64))
    with pytest.raises(RuntimeError, match="weight tiles do not match their shape"):
        decoder.impl.linear_forward((1, group, tiles, *rest), torch.randn(1, 64))  # int4 tiles read as int8
    with pytest.raises(RuntimeError, match="int8 and int4 weights come as tiles"):
        decoder.impl.linear_forward((kind, group, module.weight_int4, *rest[:4]), torch.randn(1, 64))
    with pytest.raises(RuntimeError, match="one scale and min per output and group"):
        native.library().tile_int4(module.weight_int4, module.weight_scale[:, :1], module.weight_min, 32)
    with pytest.raises(RuntimeError, match="one scale per output"):
        native.library().tile_int8(torch.zeros(4, 32, dtype=torch.int8), torch.ones(3))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3"])
def test_quantized_native_step_equals_the_emulated_model(model_type, isa):
    # Rounding activations to codes is discontinuous: a value at a rounding edge may land on the other code
    # when upstream fp32 sums differ in the last bit (RMSNorm's order here vs torch's), moving that row by one
    # code's worth, and later rows see it through attention. The arithmetic itself is exact to 1e-5 per linear
    # (above); here, one layer and 12 tokens: the typical element within 0.1% of the logit range, the worst 2%.
    model = tiny(model_type, num_hidden_layers=1)
    quantize(model, "int4-g32")
    got, runner = engine_logits(model, IDS[:12])
    runner.close()
    assert runner.native is not None
    expected = reference_logits(emulated(model), IDS[:12])
    difference, scale = (got - expected).abs(), float(expected.abs().max())
    assert float(difference.median()) < 1e-3 * scale
    assert float(difference.max()) < 0.02 * scale


@pytest.mark.parametrize("method", ["int8", "int4-g32", "int4-g64"])
def test_quantized_native_step_is_near_the_transformers_path(method):
    """Three layers, 40 tokens, against the transformers path with our weight-only kernels (fp32 activations):
    what is left is the int8 activations' error."""
    model = tiny("llama")
    quantize(model, method)
    got, runner = engine_logits(model, IDS)
    runner.close()
    reference = reference_logits(model, IDS)
    assert float((got - reference).abs().max()) < 0.05 * float(reference.abs().max())


# -- rows are independent of their batch ------------------------------------------------------------------
@pytest.mark.parametrize("method,kv_cache", [("fp32", "fp32"), ("int4-g32", "fp32"), ("int4-g32", "fp16")])
def test_native_rows_are_bit_identical_alone_and_in_any_batch(method, kv_cache):
    model = tiny("llama")
    model.ryzanstein_kv_cache = kv_cache
    if method != "fp32":
        quantize(model, method)
    runner = BatchRunner(model, Path(tempfile.gettempdir()))
    try:
        prompts = [IDS[:9], IDS[3:20], IDS[7:12], IDS[1:6], IDS[10:31]]
        alone = []
        for i, prompt in enumerate(prompts):
            kv = runner.cache(f"alone{i}")
            kv.reserve(64)
            first = runner.forward(build_rows([(kv, prompt, 0, False, "all")]), "prefill")
            alone.append(torch.cat([first, runner.forward(build_rows([(kv, [9], len(prompt), True, "all")]),
                                                          "decode")]))
        caches = [runner.cache(f"batch{i}") for i in range(len(prompts))]
        for kv in caches:
            kv.reserve(64)
        pairs = list(zip(caches, prompts, strict=True))
        together = runner.forward(build_rows([(kv, p, 0, False, "all") for kv, p in pairs]), "prefill")
        decoded = runner.forward(build_rows([(kv, [9], len(p), True, "all") for kv, p in pairs]), "decode")
        start = 0
        for i, prompt in enumerate(prompts):
            assert torch.equal(together[start:start + len(prompt)], alone[i][:-1])
            assert torch.equal(decoded[i], alone[i][-1])
            start += len(prompt)
    finally:
        runner.close()


def test_thread_count_does_not_change_a_single_bit():
    model = tiny("llama")
    quantize(model, "int8")
    results = []
    for threads in (1, 2, 3):
        runner = BatchRunner(model, Path(tempfile.gettempdir()))
        runner.native.set_threads(threads)
        kv = runner.cache("a")
        kv.reserve(32)
        results.append(runner.forward(build_rows([(kv, IDS[:20], 0, False, "all")]), "prefill"))
        runner.close()
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# -- where the native path does not apply -----------------------------------------------------------------
def test_an_unsupported_architecture_falls_back_with_a_log_line(caplog):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(by_model_type("olmo2"))).eval()
    with caplog.at_level(logging.INFO, logger="ryzanstein.native"):
        runner = BatchRunner(model, Path(tempfile.gettempdir()))
    try:
        assert runner.native is None
        assert "native decode path not used" in caplog.text and "olmo2" in caplog.text
        kv = runner.cache("a")
        kv.reserve(16)
        got = runner.forward(build_rows([(kv, IDS[:8], 0, False, "all")]), "prefill")
        torch.testing.assert_close(got, reference_logits(model, IDS[:8]), atol=1e-4, rtol=1e-4)
    finally:
        runner.close()


def test_settings_the_native_step_does_not_cover_use_the_reference_path(caplog):
    from ryzanstein.engine.sparse import AttentionPattern

    model = tiny("llama")
    for attribute, value, said in (("ryzanstein_kv_cache", "int8", "int8 KV cache"),
                                   ("ryzanstein_attention", AttentionPattern("window", window=8), "window")):
        setattr(model, attribute, value)
        with caplog.at_level(logging.INFO, logger="ryzanstein.native"):
            runner = BatchRunner(model, Path(tempfile.gettempdir()))
        assert runner.native is None and said in caplog.text
        runner.close()
        delattr(model, attribute)


def test_decode_path_option_forces_either_path():
    model = tiny("llama")
    model.ryzanstein_decode_path = "reference"
    runner = BatchRunner(model, Path(tempfile.gettempdir()))
    assert runner.native is None
    runner.close()
    olmo = AutoModelForCausalLM.from_config(tiny_config(by_model_type("olmo2"))).eval()
    olmo.ryzanstein_decode_path = "native"
    with pytest.raises(InvalidRequest, match="native decode path cannot run this model.*olmo2"):
        BatchRunner(olmo, Path(tempfile.gettempdir()))


def test_bad_instruction_set_requests_are_refused_clearly(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, "sse9")
    with pytest.raises(InvalidRequest, match="RYZANSTEIN_ISA='sse9' is invalid"):
        native.chosen_isa()
    missing = [isa for isa in native.ISA_LEVELS if isa not in native.available_isas()]
    if missing:
        monkeypatch.setenv(native.ISA_ENV, missing[0])
        with pytest.raises(InvalidRequest, match="this CPU does not run it"):
            native.chosen_isa()
    monkeypatch.delenv(native.ISA_ENV)
    decoder = native.NativeDecoder(tiny("llama"))
    with pytest.raises(RuntimeError, match="this CPU does not support|level must be"):
        decoder.impl.set_isa(7)


def test_bad_rows_are_refused_before_anything_is_written():
    model = tiny("llama")
    runner = BatchRunner(model, Path(tempfile.gettempdir()))
    try:
        kv = runner.cache("a")
        kv.reserve(8)
        runner.forward(build_rows([(kv, IDS[:4], 0, False, "last")]), "prefill")
        before = [t.clone() for t in kv.plain_rows(0, 8, 2, 32)]
        with pytest.raises(RuntimeError, match="token id out of range"):
            runner.forward(build_rows([(kv, [10**6], 4, True, "all")]), "decode")
        with pytest.raises(RuntimeError, match="position beyond the cache"):
            runner.native.impl.step(torch.tensor([5]), torch.tensor([10**5]), torch.tensor([0]),
                                    [[kv.plain_rows(i, 8, 2, 32)[0] for i in range(3)]],
                                    [[kv.plain_rows(i, 8, 2, 32)[1] for i in range(3)]], torch.tensor([0]))
        after = kv.plain_rows(0, 8, 2, 32)
        for old, new in zip(before, after, strict=True):  # every byte, the unwritten rows (any bits) included
            torch.testing.assert_close(new, old, atol=0, rtol=0, equal_nan=True)
    finally:
        runner.close()


# -- threads -----------------------------------------------------------------------------------------------
def test_thread_policy_follows_measured_step_times():
    """Fed step times: the first round picks the faster count; when the machine changes (other programs take
    the cores) the next round moves; prefill-sized steps are not counted."""
    policy = native.ThreadPolicy([1, 2], period=10, probe=3)
    cost = {1: 0.010, 2: 0.006}

    def run(steps: int) -> None:
        for _ in range(steps):
            threads = policy.next_threads()
            policy.observe(threads, 1, cost[threads])
            policy.observe(threads, 64, 5.0)  # a prefill chunk: ignored

    run(6)
    assert policy.current == 2 and not policy.queue
    cost = {1: 0.010, 2: 0.080}  # two threads now wait for descheduled peers
    run(10 + 6)
    assert policy.current == 1
    run(10 + 6)
    assert policy.current == 1  # stays while it is the best
    assert native.ThreadPolicy([1]).next_threads() == 1


def test_thread_policy_probes_less_after_clear_decisions_and_at_once_on_drift():
    """Trying the losing count costs steps: after clear decisions rounds back off (up to 8x the period); a
    change in the kept count's step time (the machine got busy) starts a round at once, whatever the wait."""
    policy = native.ThreadPolicy([1, 2], period=10, probe=3)
    cost = {1: 0.013, 2: 0.008}  # eight rows: two threads clearly win
    tried: list[int] = []

    def run(steps: int) -> None:
        for _ in range(steps):
            threads = policy.next_threads(8)
            tried.append(threads)
            policy.observe(threads, 8, cost[threads])

    run(400)
    rounds = policy.classes[2].rounds
    assert policy.decision(8) == 2 and policy.classes[2].backoff == 8
    assert 4 <= rounds <= 9  # a fixed period of 10 would have run ~25 rounds
    assert tried.count(1) == 2 * rounds  # a clear loser gives up after two steps (of 3)
    cost = {1: 0.013, 2: 0.040}  # two threads now wait for a descheduled peer
    tried.clear()
    run(12)
    assert policy.decision(8) == 1
    assert policy.classes[2].backoff == 2  # the wait started over from the period (then this clear decision)
    assert tried[:2] == [2, 2] and tried[2:5] == [1, 1, 1]  # seen once slow steps are the median of the last 3

    close = native.ThreadPolicy([1, 2], period=10, probe=3)  # close costs: every period, as before
    for _ in range(200):
        threads = close.next_threads(8)
        close.observe(threads, 8, {1: 0.0100, 2: 0.0095}[threads])
    assert close.classes[2].backoff == 1 and close.classes[2].rounds >= 12


def test_thread_policy_gives_up_a_clearly_slower_probe_after_two_steps():
    """A probe ≥ 1.5x the kept count's recent steps stops after two steps, from the first round on (the kept
    count is measured first); a close one, or one faster than the kept count now runs, gets all its steps."""
    policy = native.ThreadPolicy([1, 2], period=10, probe=4)
    tried: list[int] = []

    def run(steps: int, cost: dict[int, float]) -> None:
        for _ in range(steps):
            threads = policy.next_threads(8)
            tried.append(threads)
            policy.observe(threads, 8, cost[threads])

    run(6, {1: 0.016, 2: 0.008})  # first round: two threads measured first, one thread given up after two
    assert tried == [2, 2, 2, 2, 1, 1] and policy.decision(8) == 2 and policy.classes[2].rounds == 1
    tried.clear()
    run(2, {1: 0.016, 2: 0.030})  # the kept count slows down (drift): one thread is now the faster one
    run(8, {1: 0.016, 2: 0.030})
    assert tried[2:6] == [1, 1, 1, 1]  # measured in full against the kept count as it runs now
    assert policy.decision(8) == 1
    close = native.ThreadPolicy([1, 2], period=10, probe=4)
    steps = []
    for _ in range(8):
        threads = close.next_threads(8)
        steps.append(threads)
        close.observe(threads, 8, {1: 0.0110, 2: 0.0100}[threads])
    assert steps == [2, 2, 2, 2, 1, 1, 1, 1]  # within 1.5x: every step of the probe


def test_thread_policy_decides_one_row_and_many_row_steps_apart():
    """One decode row reads weights (one thread may do), eight rows multiply them (two threads win): a choice
    made on one-row steps must not run eight-row steps, and prompt chunks follow the many-row choice."""
    policy = native.ThreadPolicy([1, 2], period=10, probe=3)
    cost = {(1, 1): 0.004, (2, 1): 0.005, (1, 8): 0.013, (2, 8): 0.008}
    for _ in range(12):
        for rows in (1, 8):
            threads = policy.next_threads(rows)
            policy.observe(threads, rows, cost[threads, rows])
    assert policy.decision(1) == 1 and policy.decision(8) == 2
    assert policy.next_threads(64) == 2
    assert policy.decision(3) == 2  # 2-3 rows: not measured yet, the default (all threads)


def test_fixed_native_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv(native.THREADS_ENV, "1")
    decoder = native.NativeDecoder(tiny("llama"))
    assert decoder.policy is None and decoder.threads == 1
    for bad in ("0", "many", "-2"):
        monkeypatch.setenv(native.THREADS_ENV, bad)
        with pytest.raises(InvalidRequest, match="RYZANSTEIN_NATIVE_THREADS=.* is invalid"):
            native.NativeDecoder(tiny("llama"))


def test_a_machine_that_cannot_build_the_library_falls_back(monkeypatch, caplog):
    def no_compiler():
        raise OSError("c++: command not found")

    monkeypatch.setattr(native, "extension", no_compiler)
    monkeypatch.setattr(native, "_build_error", [])
    model = tiny("llama")
    native.prepare(model)  # a load does not fail
    with caplog.at_level(logging.INFO, logger="ryzanstein.native"):
        runner = BatchRunner(model, Path(tempfile.gettempdir()))
    assert runner.native is None and "could not be built" in caplog.text and "command not found" in caplog.text
    runner.close()
    with pytest.raises(InvalidRequest, match="could not be built"):
        native.require_native(model, "fp32", "dense", True)


def test_a_bad_decode_path_is_refused_before_anything_loads(tmp_path):
    from ryzanstein.models.manager import ModelManager
    from ryzanstein.models.store import ModelStore

    manager = ModelManager(ModelStore(tmp_path / "store"), budget_bytes=2**30)
    with pytest.raises(InvalidRequest, match="decode_path='fast' is invalid: use one of auto, native, reference"):
        manager.load("anything", decode_path="fast")
    assert manager.loaded_names() == []


@pytest.mark.parametrize("given, expected", [(None, "10000"), ("250", "250")])
def test_openmp_workers_stop_spinning_soon_unless_the_user_says_otherwise(given, expected):
    """torch's spinning OpenMP workers took the native pool's cores between steps (8 concurrent requests at
    ~0.7x); importing ryzanstein shortens the spin before torch loads, and keeps a value the user set."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    shown = subprocess.run([sys.executable, "-c", "import ryzanstein, os, sys; print(os.environ['GOMP_SPINCOUNT']);"
                            "print('torch' in sys.modules)"], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.split() == [expected, "False"]  # set, and torch not yet loaded by then


@pytest.mark.parametrize("threads", [2, 3])
def test_the_pool_runs_every_chunk_once_within_its_job(threads):
    """Back-to-back jobs of 1-13 chunks: each chunk runs exactly once and never after its job returned (a late
    thread once compared the previous job's last index with the next job's count, ran a chunk of an ended job
    and let a call return while chunks still ran: the service crashed in a linear's chunk)."""
    assert native.library().pool_selftest(threads, 50_000) == 0
