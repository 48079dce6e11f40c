"""Router logits for the benchmarks: real routing of the trained reference models, or a documented
skewed synthetic distribution where no trained model has the shape.

Real: the reference checkpoint (transformers, bf16) runs teacher-forced over held-out text --
``CODE_WINDOWS`` seeded windows of ``CODE_LEN`` tokens from the held-out stdlib files plus
``ARITH_PROBLEMS`` held-out additions with their answers -- and every MoE layer's router logits
are kept ([layers, tokens, E], float32, cached under ``.cache/bench/``). A decode batch of B rows
is B tokens drawn without replacement from one layer (B requests at different positions).

Synthetic (``SyntheticSkew``): per layer, an expert popularity vector p ~ Dirichlet(c * 1_E);
token t's logits are z[t, e] = s * log p[e] + sigma * N(0, 1), i.i.d. over tokens and experts.
Small c concentrates the batch on few experts. The defaults (c = 1, s = 1, sigma = 1.5) are
fitted to the trained fine-grained reference model (qwen3-moe-mini, E=32 k=4: mean stock union
22.1 / 25.7 / 28.3 experts at B = 16 / 32 / 64 for real routing vs 21.1 / 24.9 / 27.3
synthetic; ``python benchmark/routing_data.py --calibrate``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import CACHE_DIR, models_dir

CODE_WINDOWS = 24
CODE_LEN = 128
ARITH_PROBLEMS = 256


@dataclass(frozen=True)
class SyntheticSkew:
    concentration: float = 1.0  # Dirichlet c of the per-layer expert popularity
    scale: float = 1.0  # s: weight of log-popularity in the logits
    sigma: float = 1.5  # per-token, per-expert Gaussian noise
    seed: int = 0

    def describe(self) -> str:
        return (f"synthetic: p~Dirichlet({self.concentration}), z = {self.scale}*log p + "
                f"{self.sigma}*N(0,1), seed {self.seed}")

    def logits(self, num_layers: int, num_tokens: int, num_experts: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        alpha = torch.full((num_experts,), self.concentration)
        out = torch.empty(num_layers, num_tokens, num_experts)
        for layer in range(num_layers):
            gamma = torch._standard_gamma(alpha.expand(1, -1).contiguous(), generator=gen)
            popularity = (gamma / gamma.sum()).clamp_min(1e-12)[0]
            noise = torch.randn(num_tokens, num_experts, generator=gen)
            out[layer] = self.scale * popularity.log()[None, :] + self.sigma * noise
        return out


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in [*sorted(folder.glob("*.safetensors")), folder / "config.json"]:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(f"{CODE_WINDOWS}:{CODE_LEN}:{ARITH_PROBLEMS}".encode())
    return digest.hexdigest()[:12]


@torch.no_grad()
def collect_real(folder: Path, threads: int = 2) -> torch.Tensor:
    """[layers, tokens, E] float32 router logits of a reference checkpoint (cached)."""
    cache = CACHE_DIR / f"router-{folder.name}-{_fingerprint(folder)}.pt"
    if cache.is_file():
        return torch.load(cache)
    from lynx.reference.data import ArithmeticPacker, code_stream, code_windows
    from lynx.reference.loading import load_reference
    from lynx.reference.tasks import heldout_problems

    torch.set_num_threads(threads)
    model, tok = load_reference(folder)
    windows = code_windows(code_stream(tok, "heldout"), CODE_WINDOWS, CODE_LEN,
                           torch.Generator().manual_seed(11))
    packer = ArithmeticPacker(tok)
    arith = [packer.problem(a, b)[0] for a, b in heldout_problems(ARITH_PROBLEMS)]
    width = max(len(ids) for ids in arith)
    pad = packer.pad
    assert isinstance(pad, int)
    arith_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in arith])
    arith_mask = torch.ne(arith_ids, pad)
    per_layer: list[list[torch.Tensor]] = []
    for ids, mask in ((windows, torch.ones_like(windows, dtype=torch.bool)),
                      (arith_ids, arith_mask)):
        for chunk, chunk_mask in zip(ids.split(32), mask.split(32), strict=True):
            out = model(input_ids=chunk, attention_mask=chunk_mask.long(),
                        output_router_logits=True)
            flat_mask = chunk_mask.reshape(-1)
            for layer, logits in enumerate(out.router_logits):
                if len(per_layer) <= layer:
                    per_layer.append([])
                per_layer[layer].append(logits.float().reshape(flat_mask.numel(), -1)[flat_mask])
    logits = torch.stack([torch.cat(parts) for parts in per_layer])
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(logits, cache)
    return logits


def reference_logits(name: str) -> torch.Tensor | None:
    """Real router logits of reference model ``name``, or None when its checkpoint is absent."""
    folder = models_dir() / name
    if not (folder / "config.json").is_file():
        return None
    return collect_real(folder)


def draw_batches(logits: torch.Tensor, batch: int, draws: int, seed: int,
                 every_layer: bool = False) -> list[tuple[int, torch.Tensor]]:
    """``draws`` decode batches: (layer, [batch, E]) with rows sampled without replacement;
    the layer drawn at random, or with ``every_layer`` taken in turn (each layer equally often
    when ``draws`` is a multiple of the layer count: a per-layer table's mean cost)."""
    gen = torch.Generator().manual_seed(seed * 1_000 + batch)
    layers, tokens, _ = logits.shape
    out = []
    for i in range(draws):
        layer = i % layers if every_layer else int(torch.randint(0, layers, (1,), generator=gen))
        rows = torch.randperm(tokens, generator=gen)[:batch]
        out.append((layer, logits[layer, rows].contiguous()))
    return out


def union_stats(logits: torch.Tensor, top_k: int, batches: tuple[int, ...] = (1, 4, 16, 32, 64),
                draws: int = 200) -> dict[str, float]:
    """Mean stock union of top-k experts per decode batch, and the share of the top-1 votes
    going to the 25% most popular experts (a skew summary)."""
    stats: dict[str, float] = {}
    for batch in batches:
        unions = [len(torch.unique(z.topk(top_k, dim=-1).indices))
                  for _, z in draw_batches(logits, batch, draws, seed=5)]
        stats[f"union_B{batch}"] = round(sum(unions) / len(unions), 2)
    top1 = logits.argmax(-1)  # [L, N]
    experts = logits.shape[-1]
    share = []
    for layer in range(logits.shape[0]):
        counts = torch.bincount(top1[layer], minlength=experts).sort(descending=True).values
        share.append(float(counts[: max(1, experts // 4)].sum() / counts.sum()))
    stats["top1_share_of_top_quarter"] = round(sum(share) / len(share), 3)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true",
                        help="compare union statistics of real and synthetic routing")
    parser.add_argument("--model", default="qwen3-moe-mini")
    args = parser.parse_args(argv)
    real = reference_logits(args.model)
    if real is None:
        print(f"no checkpoint for {args.model} under {models_dir()}", file=sys.stderr)
        return 2
    experts = real.shape[-1]
    top_k = int(json.loads((models_dir() / args.model / "config.json").read_text())
                ["num_experts_per_tok"])
    print(f"real {args.model} {tuple(real.shape)}: {union_stats(real, top_k)}")
    if args.calibrate:
        for c in (0.1, 0.3, 1.0):
            for sigma in (1.0, 1.5, 2.5):
                skew = SyntheticSkew(concentration=c, sigma=sigma)
                synth = skew.logits(real.shape[0], real.shape[1], experts)
                print(f"c={c} sigma={sigma}: {union_stats(synth, top_k)}")
        print(f"default: {asdict(SyntheticSkew())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
