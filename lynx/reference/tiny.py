"""Tiny randomly initialised checkpoints of production MoE architectures, for tests and
benchmarks that must run a real model of a kind none of which can be downloaded here.

Each keeps its checkpoint's *router* exactly (`ROUTERS`: the public config.json values of
experts, top-k, grouping, scoring, correction bias, routed scaling factor, shared experts,
dense first layers) and shrinks everything else (hidden size 128, 3 decoder layers, small
expert FFNs). Random weights route almost uniformly and prune at almost no cost, so the
router weights are drawn wider (logit std ~1.5 over unit-RMS hidden states, as the
conformance tests draw logits) and the routed experts' down projections larger, to make
routing skewed and pruning measurable. The vocabulary and tokenizer are the reference
models' (1024 tokens, `models/qwen3-moe-mini`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "qwen3-moe-mini"
HIDDEN, LAYERS, VOCAB = 128, 3, 1024
ROUTER_LOGIT_STD = 1.5
EXPERT_OUT_STD = 0.1

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,  # the reference tokenizer's
}
_MLA: dict[str, Any] = {  # DeepSeek's multi-head latent attention, scaled down
    "kv_lora_rank": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "qk_nope_head_dim": 32,
    "moe_intermediate_size": 32, "moe_layer_freq": 1,
    # SGLang's CPU rotary embedding for MLA takes only DeepSeek's YaRN (as the checkpoints;
    # factor 1 here: plain RoPE within the 4096 positions)
    "rope_scaling": {"rope_type": "yarn", "factor": 1.0, "rope_theta": 10000.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}

ROUTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DeepSeek-V3": ("DeepseekV3Config", {
        **_MLA, "q_lora_rank": 48, "n_routed_experts": 256, "num_experts_per_tok": 8,
        "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_shared_experts": 1,
        "first_k_dense_replace": 1}),
    "DeepSeek-V2": ("DeepseekV2Config", {  # DeepSeek-V2-236B's router: E160 top-6, 8/3
        **_MLA, "q_lora_rank": 48, "n_routed_experts": 160, "num_experts_per_tok": 6,
        "n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy",
        "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 16.0,
        "n_shared_experts": 2, "first_k_dense_replace": 1}),
    "DeepSeek-V2-Lite": ("DeepseekV2Config", {
        **_MLA, "q_lora_rank": None, "n_routed_experts": 64, "num_experts_per_tok": 6,
        "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax",
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "n_shared_experts": 2,
        "first_k_dense_replace": 1}),
    "GLM-4.5-Air": ("Glm4MoeConfig", {
        "moe_intermediate_size": 32, "n_routed_experts": 128, "num_experts_per_tok": 8,
        "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "head_dim": 32,
        "partial_rotary_factor": 0.5}),
    # DeepSeek-V3's router (8 groups / 4, sigmoid + bias, rsf 2.5) in GLM-4.5's body: SGLang's
    # CPU engine and transformers compute the same GLM forward, while their MLA forwards
    # differ (see the README's calibration section), so this is the grouped router's check
    "GLM-4.5-DSV3-router": ("Glm4MoeConfig", {
        "moe_intermediate_size": 32, "n_routed_experts": 256, "num_experts_per_tok": 8,
        "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "head_dim": 32,
        "partial_rotary_factor": 0.5}),
    "GPT-OSS-20B": ("GptOssConfig", {
        "num_local_experts": 32, "num_experts_per_tok": 4, "head_dim": 32,
        "intermediate_size": 64, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "Qwen2-57B-A14B": ("Qwen2MoeConfig", {
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 128}),
    "OLMoE-1B-7B": ("OlmoeConfig", {
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
        "intermediate_size": 32}),
}


def _widen_routing(model: torch.nn.Module) -> None:
    """Router weights with logit std `ROUTER_LOGIT_STD`; routed experts' down projections
    with std `EXPERT_OUT_STD` (a trained checkpoint's routing is skewed)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[0]
            if leaf.endswith((".gate", ".router")) and name.endswith(".weight"):
                param.normal_(0.0, ROUTER_LOGIT_STD / math.sqrt(param.shape[-1]))
            elif leaf.endswith(".router") and name.endswith(".bias"):  # GPT-OSS
                param.normal_(0.0, 0.1)
            elif ".experts." in name and "down" in name and "shared" not in name:
                param.normal_(0.0, EXPERT_OUT_STD)
        for name, buffer in model.named_buffers():  # DeepSeek-V3, GLM-4.5: a buffer
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)


def tiny_config(name: str) -> Any:
    """The transformers config of checkpoint ``name`` (a key of `ROUTERS`), with the fields
    SGLang reads that not every transformers config keeps. Raises KeyError for an unknown
    name."""
    import transformers

    class_name, values = ROUTERS[name]
    config = getattr(transformers, class_name)(**{**_COMMON, **values})
    for key in ("moe_layer_freq", "topk_method", "scoring_func"):
        if key in values:
            setattr(config, key, values[key])
    return config


def tiny_model(name: str, seed: int = 0) -> Any:
    """The transformers model of checkpoint ``name`` (a key of `ROUTERS`), fp32, eval mode.
    Raises KeyError for an unknown name."""
    import transformers

    config = tiny_config(name)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _widen_routing(model)
    return model.eval()


def write_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Write checkpoint ``name`` (a key of `ROUTERS`) to ``folder`` (fp32 safetensors,
    config.json, the reference tokenizer); returns ``folder``. Raises KeyError for an
    unknown name."""
    tiny_model(name, seed).save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / file, folder / file)
    return folder
