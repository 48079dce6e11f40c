"""Reference model registry and checkpoint validation (clear one-line errors for bad input)."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# LYNX_MODELS_DIR: another folder holding the reference model folders below (e.g. retrained).
MODELS_DIR = Path(os.environ.get("LYNX_MODELS_DIR") or REPO_ROOT / "models")
REFERENCE_MODELS: dict[str, Path] = {
    "mixtral-mini": MODELS_DIR / "mixtral-mini",
    "qwen3-moe-mini": MODELS_DIR / "qwen3-moe-mini",
    "qwen3-moe-128": MODELS_DIR / "qwen3-moe-128",
}
# Architectures SGLang 0.5.23 serves on the CPU engine with the torch-native paths, each
# served here with Lynx pruning from a tiny checkpoint of the real router values
# (`lynx.reference.tiny`). Qwen2-MoE needs `lynx.cpu_compat.shared_gate` (SGLang's shared-expert
# gate is a Triton kernel). Not GPT-OSS: SGLang requires an attention backend with sinks
# (triton, fa3, trtllm_mha, intel_amx, ...), none of which runs on this CPU.
CPU_SERVABLE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM",
                              "OlmoeForCausalLM", "Glm4MoeForCausalLM", "DeepseekV2ForCausalLM",
                              "DeepseekV3ForCausalLM")


class ModelError(ValueError):
    """A model name or folder that cannot be served; the message is one line."""


def resolve_model(name_or_path: str | Path, *, cpu_serving: bool = True) -> Path:
    """Map a reference-model name or a folder path to a validated checkpoint folder;
    ``cpu_serving`` False: any architecture (calibration reads the model itself or goes through
    a server that may run elsewhere), else one this CPU serves."""
    text = str(name_or_path)
    if text in REFERENCE_MODELS:
        path = REFERENCE_MODELS[text]
    elif "/" in text or Path(text).exists():
        path = Path(text).expanduser().resolve()
    else:
        known = ", ".join(sorted(REFERENCE_MODELS))
        raise ModelError(f"unknown model {text!r}: use one of {known} or a checkpoint folder path")
    validate_checkpoint(path, cpu_serving=cpu_serving)
    return path


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_file}: corrupt JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: expected a JSON object")
    return config


def validate_checkpoint(path: Path, *, cpu_serving: bool = True) -> dict:
    """Check that a folder holds a loadable MoE checkpoint (``cpu_serving``: one SGLang can
    serve on the CPU)."""
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    config = read_config(path)
    archs = config.get("architectures") or []
    if cpu_serving and not any(a in CPU_SERVABLE_ARCHITECTURES for a in archs):
        raise ModelError(
            f"{path}: architectures {archs} not servable on the CPU default "
            f"(supported: {', '.join(CPU_SERVABLE_ARCHITECTURES)})"
        )
    weights = list(path.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{path}: no *.safetensors weights")
    for weight_file in weights:
        _check_safetensors_header(weight_file)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ModelError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    return config


def _check_safetensors_header(weight_file: Path) -> None:
    size = weight_file.stat().st_size
    try:
        with weight_file.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            json.loads(fh.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{weight_file}: corrupt safetensors file ({exc})") from None


def moe_shape(config: dict) -> tuple[int, int, int]:
    """(MoE layers, experts, top_k) of a Mixtral or Qwen3-MoE config."""
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    top_k = int(config["num_experts_per_tok"])
    layers = int(config["num_hidden_layers"])
    if "mlp_only_layers" in config or "decoder_sparse_step" in config:
        step = int(config.get("decoder_sparse_step", 1) or 1)
        dense = set(config.get("mlp_only_layers") or [])
        layers = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)
    return layers, experts, top_k
