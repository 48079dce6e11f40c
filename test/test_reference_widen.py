"""Widening expert FFNs preserves the function (routing and logits) and multiplies their size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from lynx.reference.widen import widen_checkpoint, widen_tensor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _tiny(arch: str, dtype: torch.dtype = torch.float32):
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64,
                  architectures=[arch], tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "MixtralForCausalLM":
        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=24,
                                                 num_local_experts=4, num_experts_per_tok=2))
        size_key = "intermediate_size"
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **common, head_dim=8, moe_intermediate_size=12, intermediate_size=40, num_experts=8,
            num_experts_per_tok=3, norm_topk_prob=True))
        size_key = "moe_intermediate_size"
    with torch.no_grad():  # random init is tiny (std 0.02); make expert outputs matter
        for name, param in model.named_parameters():
            if "experts" in name or "gate" in name:
                param.normal_(0, 0.3)
    return model.to(dtype).eval(), size_key


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:  # the widening checks a complete checkpoint folder
        (folder / name).write_text("{}")
    return folder


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen3MoeForCausalLM"])
@pytest.mark.parametrize("n", [2, 3])
def test_widening_preserves_logits_and_routing(tmp_path: Path, arch: str, n: int) -> None:
    model, size_key = _tiny(arch)
    src = _save(model, tmp_path / "src")
    dst = widen_checkpoint(src, n, tmp_path / "wide")
    wide = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert wide.config.get_text_config().to_dict()[size_key] == n * model.config.to_dict()[size_key]
    ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, output_router_logits=True)
        out = wide(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    # Routing: layer 0 sees identical inputs (bitwise equal logits); later layers see inputs
    # equal up to fp32 rounding, and every token picks the same experts.
    torch.testing.assert_close(out.router_logits[0], ref.router_logits[0], rtol=0, atol=0)
    top_k = model.config.num_experts_per_tok
    for r, w in zip(ref.router_logits, out.router_logits, strict=True):
        torch.testing.assert_close(w, r, rtol=1e-4, atol=1e-5)
        assert torch.equal(w.topk(top_k).indices.sort().values, r.topk(top_k).indices.sort().values)
    # The experts really got wider: every expert tensor has n times the neurons.
    src_t, dst_t = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    expert_keys = [k for k in src_t if ".experts." in k]
    assert expert_keys
    for key in expert_keys:
        assert dst_t[key].numel() == n * src_t[key].numel()
    assert json.loads((dst / "widen.json").read_text())["factor"] == n
    assert (dst / "tokenizer.json").is_file()


def test_widening_bf16_power_of_two_is_exact(tmp_path: Path) -> None:
    model, _ = _tiny("MixtralForCausalLM", torch.bfloat16)
    src = _save(model, tmp_path / "src")
    dst = widen_checkpoint(src, 4, tmp_path / "wide")
    src_t, dst_t = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    w2 = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    w1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    assert dst_t[w2].dtype == torch.bfloat16
    assert torch.equal(dst_t[w2][:, ::4] * 4, src_t[w2])
    assert torch.equal(dst_t[w1][4:8], src_t[w1][1:2].expand(4, -1))


def test_widen_tensor_fused_layout_matches_split_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen),
                      torch.randn(6, 5, generator=gen))
    fused = widen_tensor(torch.cat([gate, up])[None], "fused_rows", 3)[0]
    assert torch.equal(fused, torch.cat([widen_tensor(gate, "rows", 3),
                                         widen_tensor(up, "rows", 3)]))
    assert torch.equal(widen_tensor(down[None], "fused_cols", 3)[0],
                       widen_tensor(down, "cols", 3))


def test_widen_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        widen_checkpoint(tmp_path / "missing", 2, tmp_path / "out")
    model, _ = _tiny("MixtralForCausalLM")
    src = _save(model, tmp_path / "src")
    with pytest.raises(ValueError, match="factor"):
        widen_checkpoint(src, 0, tmp_path / "out")
    with pytest.raises(ValueError, match="in place"):
        widen_checkpoint(src, 2, src)
