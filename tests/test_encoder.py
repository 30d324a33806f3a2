"""The native encoder against `transformers`' ModernBERT on the same weights (CPU, fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import ModernBertForMaskedLM as HFMaskedLM
from transformers import ModernBertModel as HFModel

from mbert_retrieval import ModernBert, ModernBertForMaskedLM, load_tokenizer
from mbert_retrieval.modeling.encoder import apply_rotary, positions_from_cu_seqlens, unpad
from mbert_retrieval.modeling.packing import sequence_of

LENGTHS = [600, 5, 17, 130, 64, 333]  # below, at and far above the 16-token local window


def padded_batch(lengths, vocab_size=1000, seed=0, extra_padding=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra_padding
    ids = torch.randint(3, vocab_size, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids * mask + 2 * (1 - mask), mask  # pad id 2 where masked


def assert_close_relative(actual, expected, mask, rtol=1e-4):
    keep = mask.bool()
    scale = expected[keep].abs().max()
    diff = (actual[keep] - expected[keep]).abs().max()
    assert diff <= rtol * scale, f"max |diff| {diff:.3e} exceeds {rtol} x max |ref| {scale:.3e}"


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_matches_transformers(hf_encoder_dir, implementation):
    hf = HFModel.from_pretrained(hf_encoder_dir, attn_implementation=implementation).eval()
    ours = ModernBert.from_pretrained(hf_encoder_dir)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = ours(ids, mask)
    assert_close_relative(actual, expected, mask)
    assert torch.all(actual[~mask.bool()] == 0), "padding positions must be zeros"


def test_mlm_logits_match_transformers(hf_mlm_dir):
    hf = HFMaskedLM.from_pretrained(hf_mlm_dir, attn_implementation="sdpa").eval()
    ours = ModernBertForMaskedLM.from_pretrained(hf_mlm_dir)
    assert ours.decoder.weight is ours.model.embeddings.tok_embeddings.weight
    ids, mask = padded_batch([40, 200, 7])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        actual = ours(ids, mask)
    assert_close_relative(actual, expected, mask)


def test_forward_packed_equals_padded(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir)
    ids, mask = padded_batch([50, 300, 9])
    packed, cu_seqlens, max_len, keep = unpad(ids, mask.bool())
    with torch.no_grad():
        padded_out = model(ids, mask)
        packed_out = model.forward_packed(packed, cu_seqlens, max_len)
    torch.testing.assert_close(packed_out, padded_out.flatten(0, 1)[keep])


def test_sequence_independent_of_batch_mates_and_padding(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir)
    ids, mask = padded_batch([123], seed=3)
    with torch.no_grad():
        alone = model(ids, mask)[0, :123]
        others, others_mask = padded_batch([400, 123, 31], seed=4, extra_padding=77)
        others[1, :123] = ids[0, :123]
        in_batch = model(others, others_mask)[1, :123]
    torch.testing.assert_close(in_batch, alone, rtol=1e-5, atol=1e-5)


def test_positions_restart_in_every_sequence():
    cu = torch.tensor([0, 3, 3 + 1, 9], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 9).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    given = sequence_of(cu, torch.arange(9, dtype=torch.int32))
    assert positions_from_cu_seqlens(cu, 9, given).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]


def test_rotary_rows_of_one_table_equal_each_theta_own(hf_encoder_dir):
    model = ModernBert.from_pretrained(hf_encoder_dir)
    positions = torch.tensor([0, 5, 1, 0, 63, 2], dtype=torch.int32)
    with torch.inference_mode():  # the table made here serves training calls too
        model.rotary_per_token(positions)
    (global_cos, global_sin), (local_cos, local_sin) = model.rotary_per_token(positions)
    for got, expected in zip(
        (global_cos, global_sin, local_cos, local_sin),
        (*model.global_rotary(positions), *model.local_rotary(positions)),
    ):
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert torch.equal(got, expected)
    assert not torch.equal(global_cos, local_cos)  # two thetas, not one table twice
    model.train()
    model.forward(torch.tensor([[5, 6, 7]])).sum().backward()
    assert all(p.grad is not None for p in model.layers[0].attn.Wqkv.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_rotary_equals_the_autograd_form_bit_for_bit(dtype):
    """Without gradients each half is written in place; with them (and compiled) q and k are cat'ed:
    the same float32 arithmetic, rounded once, on the strided q, k view of Wqkv's output."""
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(300, 3, 4, 16, generator=generator).to(dtype)
    angles = torch.rand(300, 1, 1, 8, generator=generator) * 20
    with torch.no_grad():
        fast = apply_rotary(qkv[:, :2], angles.cos(), angles.sin())
    with torch.enable_grad():  # the form autograd and torch.compile get
        reference = apply_rotary(qkv[:, :2], angles.cos(), angles.sin())
    assert fast.dtype == dtype and fast.shape == (300, 2, 4, 16)
    assert torch.equal(fast, reference)


def test_sequence_of_each_token_skips_empty_sequences():
    cu = torch.tensor([0, 3, 3, 4, 9], dtype=torch.int32)  # the second sequence is empty
    assert sequence_of(cu, torch.arange(9, dtype=torch.int32)).tolist() == [0, 0, 0, 2, 3, 3, 3, 3, 3]
    compiled = torch.compile(sequence_of, dynamic=True)  # inside a graph, as in a compiled forward
    assert compiled(cu, torch.arange(9, dtype=torch.int32)).tolist() == [0, 0, 0, 2, 3, 3, 3, 3, 3]


def test_save_loads_in_transformers(tmp_path, hf_encoder_dir, hf_mlm_dir):
    ids, mask = padded_batch([77, 20])
    ours = ModernBert.from_pretrained(hf_encoder_dir)
    ours.save_pretrained(tmp_path / "enc")
    hf = HFModel.from_pretrained(tmp_path / "enc").eval()
    with torch.no_grad():
        assert_close_relative(hf(input_ids=ids, attention_mask=mask).last_hidden_state, ours(ids, mask), mask)

    ours_mlm = ModernBertForMaskedLM.from_pretrained(hf_mlm_dir)
    ours_mlm.save_pretrained(tmp_path / "mlm")
    hf_mlm = HFMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    with torch.no_grad():
        assert_close_relative(hf_mlm(input_ids=ids, attention_mask=mask).logits, ours_mlm(ids, mask), mask)


def test_encoder_loads_from_mlm_checkpoint(hf_mlm_dir, hf_encoder_dir):
    ids, mask = padded_batch([30])
    with torch.no_grad():
        a = ModernBert.from_pretrained(hf_mlm_dir)(ids, mask)
        b = ModernBert.from_pretrained(hf_encoder_dir)(ids, mask)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("spelling", ["original", "transformers5"])
def test_both_config_spellings_load(tmp_path, hf_encoder_dir, spelling):
    config = json.loads((hf_encoder_dir / "config.json").read_text())
    for key in (
        "layer_types",
        "rope_parameters",
        "global_attn_every_n_layers",
        "global_rope_theta",
        "local_rope_theta",
    ):
        config.pop(key, None)
    if spelling == "original":
        config.update(global_attn_every_n_layers=2, global_rope_theta=50_000.0, local_rope_theta=500.0)
    else:
        config["layer_types"] = ["full_attention", "sliding_attention"] * 2
        config["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": 50_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        }
    folder = tmp_path / spelling
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((hf_encoder_dir / "model.safetensors").read_bytes())
    ours = ModernBert.from_pretrained(folder)
    assert ours.config.layer_types == ["full_attention", "sliding_attention"] * 2
    assert (ours.config.global_rope_theta, ours.config.local_rope_theta) == (50_000.0, 500.0)
    hf = HFModel.from_pretrained(folder).eval()
    ids, mask = padded_batch([90, 40])
    with torch.no_grad():
        assert_close_relative(ours(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def test_tokenizer_round_trip(hf_mlm_dir):
    tokenizer = load_tokenizer(hf_mlm_dir)
    encoded = tokenizer(["def add(a, b):\n    return a + b"])
    assert encoded["input_ids"][0][0] == tokenizer.cls_token_id
    assert encoded["input_ids"][0][-1] == tokenizer.sep_token_id
    assert "return a + b" in tokenizer.decode(encoded["input_ids"][0], skip_special_tokens=True)


def test_training_after_inference_mode(hf_encoder_dir):
    """Caches filled under inference_mode must not break a later backward pass."""
    model = ModernBert.from_pretrained(hf_encoder_dir)
    ids, mask = padded_batch([20, 9])
    with torch.inference_mode():
        model(ids, mask)
    model.train()
    model(ids, mask).square().mean().backward()
    assert model.layers[0].attn.Wqkv.weight.grad is not None


@pytest.mark.slow
def test_compiled_layers_match_eager(hf_encoder_dir):
    eager = ModernBert.from_pretrained(hf_encoder_dir)
    compiled = ModernBert.from_pretrained(hf_encoder_dir).compile_layers()
    for lengths in ([40, 7, 90], [13, 200]):  # a second token count must not need a new graph to be right
        ids, mask = padded_batch(lengths)
        packed, cu_seqlens, max_len, _ = unpad(ids, mask.bool())
        with torch.no_grad():
            expected = eager.forward_packed(packed, cu_seqlens, max_len)
            actual = compiled.forward_packed(packed, cu_seqlens, max_len)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_forward_matches_eager_with_gradients_and_in_a_copy(hf_encoder_dir):
    """The whole forward as one graph: outputs and gradients as eager for two token counts, and a
    deep copy runs its own weights (the compiled function takes the model as an argument)."""
    import copy

    eager = ModernBert.from_pretrained(hf_encoder_dir).train()
    compiled = ModernBert.from_pretrained(hf_encoder_dir).train().compile_forward()
    for lengths in ([40, 7, 90], [13, 200]):
        ids, mask = padded_batch(lengths)
        packed, cu_seqlens, max_len, _ = unpad(ids, mask.bool())
        outputs = [model.forward_packed(packed, cu_seqlens, max_len) for model in (eager, compiled)]
        for out in outputs:
            out.square().mean().backward()
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
        for (name, expected), got in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-3, atol=1e-5, msg=name)
            expected.grad, got.grad = None, None
    copied = copy.deepcopy(compiled).eval()
    with torch.no_grad():
        copied.layers[0].attn.Wo.weight.zero_()  # the copy's own weights must show in its output
        changed = copied.forward_packed(packed, cu_seqlens, max_len)
        original = compiled.eval().forward_packed(packed, cu_seqlens, max_len)
    assert not torch.allclose(changed, original)


def test_fused_norm_runs_in_compiled_training_and_eager_inference(monkeypatch):
    """The residual sum + LayerNorm kernels: compiled with gradients and eagerly without them; the
    plain code eagerly with gradients (PyTorch's backward is as good) and compiled without them
    (inductor fuses that forward itself), and on every other backend."""
    from mbert_retrieval.modeling import encoder

    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda compiling=compiling: compiling)
        with torch.no_grad():
            assert encoder.uses_fused_norm("triton") is not compiling
            assert not encoder.uses_fused_norm("varlen")
        with torch.enable_grad():
            assert encoder.uses_fused_norm("triton") is compiling
            assert not encoder.uses_fused_norm("packed_sdpa")
