"""Weight-only int8: our AVX2 kernel against a dequantized reference, batch invariance, model accuracy, and the
batching engine on an int8 model (batched == alone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ryzanstein.engine.qweights import cpu_supports_kernel, int8_linear, quantize_model_int8, quantize_weight
from ryzanstein.models.loader import load_model_folder

pytestmark = pytest.mark.skipif(not cpu_supports_kernel(), reason="needs AVX2 + FMA")


def test_kernel_equals_dequantized_matmul_and_is_batch_invariant():
    g = torch.Generator().manual_seed(0)
    for out_features, in_features in ((96, 64), (50, 40), (7, 1000)):  # 40 and 1000 exercise the scalar tail
        w = torch.randn(out_features, in_features, generator=g) * 0.1
        q, scale = quantize_weight(w)
        assert q.dtype == torch.int8 and q.abs().max() <= 127
        assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6
        x = torch.randn(11, in_features, generator=g)
        out = int8_linear(x, q, scale)
        torch.testing.assert_close(out, x @ (q.float() * scale[:, None]).T, atol=1e-4, rtol=1e-4)
        for i in range(11):  # every row alone, and inside another batch at another position
            assert torch.equal(int8_linear(x[i:i + 1], q, scale)[0], out[i])
        assert torch.equal(int8_linear(x[3:9], q, scale), out[3:9])


def test_bad_inputs_are_refused():
    q, scale = quantize_weight(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="shapes"):
        int8_linear(torch.randn(2, 15), q, scale)
    with pytest.raises(RuntimeError, match="int8"):
        from ryzanstein.engine.qweights import kernel

        kernel().int8_linear(torch.randn(2, 16), q.float(), scale)


@pytest.fixture(scope="module")
def default_pair(default_model_dir: Path):
    fp32 = load_model_folder("fp32", default_model_dir)
    int8 = load_model_folder("int8", default_model_dir)
    sizes = quantize_model_int8(int8.model)
    return fp32, int8, sizes


def test_int8_default_model_stays_close_to_fp32(default_pair):
    fp32, int8, sizes = default_pair
    assert sizes["linear_bytes_after"] < sizes["linear_bytes_before"] / 3.9
    text = ("The quick brown fox jumps over the lazy dog. Bread is made from flour, water, salt and yeast; "
            "the dough rises, is shaped and baked until the crust is golden.")
    ids = torch.tensor([fp32.tokenizer.encode(text)])
    with torch.inference_mode():
        ref = fp32.model(input_ids=ids).logits[0].float()
        got = int8.model(input_ids=ids).logits[0].float()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert kl < 0.02 and top1 > 0.9, (kl, top1)


def test_engine_on_int8_model_batched_equals_alone(default_pair, tmp_path):
    from ryzanstein.engine.batching import EngineConfig
    from tests.core.test_batching_equivalence import Req, alone, run_engine

    _, int8, _ = default_pair
    prompts = [int8.tokenizer.encode(t) for t in ("Hello, how are", "List three fruits:", "The ocean is",
                                                  "A" * 40)]
    reqs = [Req(p, 12, i, None, None) for i, p in enumerate(prompts)]
    config = EngineConfig(prefill_chunk=16, max_step_tokens=64, speculation="off")
    got = run_engine(int8, config, reqs, tmp_path)
    for req, outcome in zip(reqs, got, strict=True):
        assert outcome.tokens == alone(int8, req, 16, tmp_path).tokens
