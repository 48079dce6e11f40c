"""Sparse upcycling: a fine-grained copy of a trained MoE that starts where the source is."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from lynx.reference.upcycle import upcycle_state


def _tiny(experts: int, top_k: int, width: int) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            moe_intermediate_size=width, intermediate_size=40,
                            num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                            max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen3MoeForCausalLM(config).eval()


def test_all_children_of_the_top_parent_reproduce_it() -> None:
    torch.manual_seed(0)
    source = _tiny(experts=4, top_k=1, width=8)
    with torch.no_grad():  # make experts and routing matter (the init is std 0.02)
        for name, param in source.named_parameters():
            if "experts" in name or "gate" in name:
                param.normal_(0, 0.3)
    target = _tiny(experts=16, top_k=4, width=4)  # 2 segments x 2 copies, top-1 -> top-4
    target.load_state_dict(upcycle_state(source.state_dict(), target.state_dict(), noise=0.0))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = source(input_ids=ids).logits, target(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_noise_breaks_the_copies_and_bad_shapes_fail() -> None:
    torch.manual_seed(0)
    source, target = _tiny(4, 1, 8), _tiny(16, 4, 4)
    state = upcycle_state(source.state_dict(), target.state_dict(), noise=0.01, seed=3)
    gate = state["model.layers.0.mlp.gate.weight"]
    assert gate.shape == (16, 32) and not torch.equal(gate[0], gate[1])
    torch.testing.assert_close(gate[0], source.state_dict()["model.layers.0.mlp.gate.weight"][0],
                               atol=0.05, rtol=0)
    with pytest.raises(ValueError):
        upcycle_state(_tiny(4, 1, 8).state_dict(), _tiny(16, 4, 4).state_dict()
                      | {"lm_head.weight": torch.zeros(3, 3)})
