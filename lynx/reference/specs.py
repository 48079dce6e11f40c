"""Architectures and training plans of the two reference models (one place, quoted by the cards)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from transformers import MixtralConfig, PretrainedConfig, Qwen3MoeConfig

ARITH_LEN = 64  # tokens per packed arithmetic row
CODE_LEN = 256  # tokens per code window (training and evaluation)
MAX_POSITIONS = 512
AUX_LOSS_COEF = 0.01


@dataclass(frozen=True)
class Stage:
    """One training stage: a fresh AdamW with linear warmup then cosine decay to 10% of ``lr``."""

    name: str
    steps: int
    lr: float
    warmup: int
    digit_weights: tuple[float, ...]  # curriculum: weight of 1-, 2-, 3-digit operands
    arith_rows: int  # rows of ARITH_LEN tokens per step
    code_rows: int  # windows of CODE_LEN tokens per step
    code_weight: float = 1.0  # weight of the code loss next to the arithmetic loss


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    config: dict
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    seed: int = 0

    def build_config(self, vocab_size: int, eos_id: int, pad_id: int) -> PretrainedConfig:
        common = dict(
            vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
            output_router_logits=True, router_aux_loss_coef=AUX_LOSS_COEF,
            tie_word_embeddings=False, architectures=[self.architecture],
        )
        if self.architecture == "MixtralForCausalLM":
            return MixtralConfig(**common, **self.config)
        if self.architecture == "Qwen3MoeForCausalLM":
            return Qwen3MoeConfig(**common, **self.config)
        raise ValueError(f"unsupported architecture {self.architecture}")

    def describe(self) -> dict:
        return {"architecture": self.architecture, "config": self.config, "seed": self.seed,
                "stages": [asdict(s) for s in self.stages]}


def _stages(scale: float) -> tuple[Stage, ...]:
    """Stage 1: code + a 1/2/3-digit curriculum; stage 2: optimizer restart, mostly 3-digit."""
    return (
        Stage("mixed-curriculum", round(1000 * scale), 2e-3, 100, (0.25, 0.35, 0.40), 32, 4),
        Stage("arithmetic-focus", round(800 * scale), 1e-3, 80, (0.10, 0.20, 0.70), 32, 2, 0.5),
    )


SPECS: dict[str, ModelSpec] = {
    "mixtral-mini": ModelSpec(
        name="mixtral-mini",
        architecture="MixtralForCausalLM",
        config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                    num_experts_per_tok=2, rope_theta=10000.0),
        stages=_stages(1.0),
        seed=1,
    ),
    "qwen3-moe-mini": ModelSpec(
        name="qwen3-moe-mini",
        architecture="Qwen3MoeForCausalLM",
        config=dict(hidden_size=128, moe_intermediate_size=64, intermediate_size=256,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[], rope_theta=10000.0),
        stages=_stages(1.0),
        seed=2,
    ),
}
