"""Architectures and training plans of the reference models (one place, quoted by the cards)."""

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
    digit_weights: tuple[float, ...]  # curriculum: weight of 1-, 2-, 3-(, 4-)digit operands
    arith_rows: int  # rows of ARITH_LEN tokens per step
    code_rows: int  # windows of CODE_LEN tokens per step
    code_weight: float = 1.0  # weight of the code loss next to the arithmetic loss


@dataclass(frozen=True)
class Selection:
    """Checkpoint selection on a task's validation set (teacher-forced exact match, probed at
    every evaluation step): when the final checkpoint scores above ``high``, the latest probed
    checkpoint scoring in ``[low, high]`` is kept instead, so that the task stays off its ceiling
    and accuracy lost to expert pruning can show."""

    task: str
    low: float
    high: float


@dataclass(frozen=True)
class ModelSpec:
    """One reference model: architecture, config overrides, training stages, scored tasks."""

    name: str
    architecture: str
    config: dict
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    seed: int = 0
    tasks: tuple[str, ...] = ("add3",)  # named tasks of lynx.reference.tasks.TASKS it is scored on
    selection: Selection | None = None
    init_from: str | None = None  # a trained reference model to upcycle from (see upcycle.py)

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
        """The spec as JSON-able data (``training.json``'s ``spec``)."""
        out = {"architecture": self.architecture, "config": self.config, "seed": self.seed,
               "stages": [asdict(s) for s in self.stages], "tasks": list(self.tasks)}
        if self.selection is not None:
            out["selection"] = asdict(self.selection)
        if self.init_from is not None:
            out["init_from"] = self.init_from
        return out


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
    # Production routing ratio (Qwen3-30B-A3B: 128 experts, top-8) at toy width: many narrow
    # experts, upcycled from qwen3-moe-mini (each expert cut in 2 segments x 2 copies) and
    # fine-tuned on the harder 4-digit task too (stopped off its ceiling, see Selection).
    "qwen3-moe-128": ModelSpec(
        name="qwen3-moe-128",
        architecture="Qwen3MoeForCausalLM",
        config=dict(hidden_size=128, moe_intermediate_size=32, intermediate_size=256,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[], rope_theta=10000.0),
        stages=(Stage("upcycled-finetune", 700, 1e-3, 30, (0.05, 0.10, 0.35, 0.50), 24, 1, 0.5),),
        seed=3,
        tasks=("add3", "add4"),
        selection=Selection("add4", 0.82, 0.90),
        init_from="qwen3-moe-mini",
    ),
}
