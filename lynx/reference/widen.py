"""Function-preserving widening of every expert's FFN: ``python -m lynx.reference.widen``.

Each intermediate neuron of each expert is duplicated ``n`` times (rows of the gate and up
projections repeated) and the down projection's columns are repeated and divided by ``n``:

    down' @ (act(gate' x) * up' x) = sum_j n * (down[:, j] / n) * act(gate_j x) * up_j x

so routing (the router is untouched) and outputs are identical up to rounding; the experts do
``n`` times the work. The arithmetic is done in fp32. By default the new checkpoint keeps the
source dtype (bf16 for the committed models): for ``n`` a power of two, dividing by ``n`` is exact
in bf16, so the widened bf16 weights are exact; other ``n`` round ``down / n`` to bf16 (relative
error <= 2^-9) unless ``--dtype float32`` is given. Written under ``.cache/models/<name>-wide<n>/``
(never committed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lynx.reference.data import REPO_ROOT
from lynx.reference.loading import ReferenceModelError, check_reference

WIDE_DIR = REPO_ROOT / ".cache" / "models"
# (config key of the expert FFN size, {weight-name suffix: how to widen it})
LAYOUTS: dict[str, tuple[str, dict[str, str]]] = {
    "MixtralForCausalLM": ("intermediate_size",
                           {"w1.weight": "rows", "w3.weight": "rows", "w2.weight": "cols"}),
    "Qwen3MoeForCausalLM": ("moe_intermediate_size",
                            {"gate_proj.weight": "rows", "up_proj.weight": "rows",
                             "down_proj.weight": "cols"}),
}
# Fused expert tensors (the in-memory layout of transformers 5), in case a checkpoint uses them.
FUSED = {"gate_up_proj": "fused_rows", "down_proj": "fused_cols"}
_EXPERT_KEY = re.compile(r"\.experts\.(?:\d+\.)?(?P<suffix>[a-z0-9_]+(?:\.weight)?)$")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def widen_tensor(weight: torch.Tensor, mode: str, n: int) -> torch.Tensor:
    """Widen one expert tensor (fp32 math); ``mode`` says which axis holds the neurons."""
    w = weight.float()
    if mode == "rows":  # [I, H] -> [n*I, H], neuron j -> rows j*n .. j*n+n-1
        return w.repeat_interleave(n, dim=0)
    if mode == "cols":  # [H, I] -> [H, n*I], each copy carries 1/n of the contribution
        return w.repeat_interleave(n, dim=1) / n
    if mode == "fused_rows":  # [E, 2I, H]: gate and up halves widened separately
        gate, up = w.chunk(2, dim=1)
        return torch.cat([gate.repeat_interleave(n, dim=1), up.repeat_interleave(n, dim=1)], 1)
    if mode == "fused_cols":  # [E, H, I]
        return w.repeat_interleave(n, dim=2) / n
    raise ValueError(f"unknown widening mode {mode!r}")


def _mode_for(key: str, layout: dict[str, str], tensor: torch.Tensor) -> str | None:
    match = _EXPERT_KEY.search(key)
    if match is None:
        return None
    suffix = match.group("suffix")
    if suffix in layout:
        return layout[suffix]
    base = suffix.removesuffix(".weight")
    if base in FUSED and tensor.dim() == 3:
        return FUSED[base]
    return None


def _extras(src: Path) -> list[Path]:
    """The checkpoint's files a widened copy takes over as they are (tokenizer, card,
    ``lynx_ladder.json``): all but the weights and ``config.json``."""
    return [p for p in src.iterdir()
            if p.suffix != ".safetensors" and p.name != "config.json" and p.is_file()]


def widen_checkpoint(src: str | Path, n: int, dst: str | Path | None = None,
                     dtype: str = "same") -> Path:
    """Write the widened copy of checkpoint ``src`` to ``dst``; return ``dst``."""
    if n < 1:
        raise ValueError(f"widening factor must be >= 1, got {n}")
    src = check_reference(src)
    config = json.loads((src / "config.json").read_text())
    arch = next((a for a in config.get("architectures") or [] if a in LAYOUTS), None)
    if arch is None:
        raise ReferenceModelError(f"{src}: architectures {config.get('architectures')} "
                                  f"cannot be widened (supported: {', '.join(LAYOUTS)})")
    size_key, layout = LAYOUTS[arch]
    dst = Path(dst) if dst is not None else WIDE_DIR / f"{src.name}-wide{n}"
    if dst.resolve() == src.resolve():
        raise ValueError(f"refusing to widen {src} in place")
    dst.mkdir(parents=True, exist_ok=True)
    widened = 0
    for weight_file in sorted(src.glob("*.safetensors")):
        tensors = load_file(weight_file)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            mode = _mode_for(key, layout, tensor)
            target = tensor.dtype if dtype == "same" else DTYPES[dtype]
            if mode is None:
                out[key] = tensor.to(target)
            else:
                out[key] = widen_tensor(tensor, mode, n).to(target).contiguous()
                widened += 1
        save_file(out, dst / weight_file.name, metadata={"format": "pt"})
    if widened == 0:
        raise ReferenceModelError(f"{src}: no expert weights found to widen")
    config[size_key] = int(config[size_key]) * n
    if dtype != "same":
        config["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in _extras(src):
        shutil.copy2(extra, dst / extra.name)
    if (dst / "model.safetensors.index.json").is_file():
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        index.get("metadata", {}).pop("total_size", None)
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    provenance = {"source": str(src), "factor": n, "dtype": dtype, "widened_tensors": widened,
                  size_key: config[size_key]}
    (dst / "widen.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return dst


def cached_widening(src: str | Path, n: int, dst: str | Path, dtype: str = "float32") -> Path:
    """``dst`` holding the widened copy of ``src``: built when missing or older than the
    source weights; the source's other files (tokenizer, ``lynx_ladder.json``) refreshed when
    newer. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    stamp = dst / "widen.json"
    src_mtime = max(p.stat().st_mtime for p in src.glob("*.safetensors"))
    if not stamp.is_file() or stamp.stat().st_mtime < src_mtime:
        return widen_checkpoint(src, n, dst, dtype=dtype)
    for extra in _extras(src):
        copy = dst / extra.name
        if not copy.is_file() or copy.stat().st_mtime < extra.stat().st_mtime:
            shutil.copy2(extra, copy)
    return dst


def main(argv: list[str] | None = None) -> int:
    from lynx.reference.specs import SPECS
    from lynx.reference.train import MODELS_DIR

    parser = argparse.ArgumentParser(prog="python -m lynx.reference.widen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all",
                        help="a reference model name, 'all', or a checkpoint folder")
    parser.add_argument("--factor", "-n", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (one model only); default .cache/models/<name>-wide<n>")
    parser.add_argument("--dtype", default="same", choices=["same", *DTYPES])
    args = parser.parse_args(argv)
    if args.model == "all":
        sources = [MODELS_DIR / name for name in SPECS]
    elif args.model in SPECS:
        sources = [MODELS_DIR / args.model]
    else:
        sources = [Path(args.model)]
    if args.out is not None and len(sources) > 1:
        parser.error("--out needs a single --model")
    for src in sources:
        try:
            dst = widen_checkpoint(src, args.factor, args.out, args.dtype)
        except (FileNotFoundError, ValueError) as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 2
        print(f"{src} -> {dst} (expert FFN x{args.factor})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
