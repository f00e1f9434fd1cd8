"""HF checkpoint folders of random-weight models at the shapes the GPU benchmarks use (latency does not depend on
the weights):

    python -m bench.shapes llama8b -o DIR            # Llama-3.1-8B: 32 layers, d 4096, FFN 14336, 32 heads, 8 KV
    python -m bench.shapes llama8b-puzzle -o DIR     # the same with attention removed in layers 8-23 (nemotron-nas)
    python -m bench.shapes mini[-puzzle] -o DIR      # 8 layers, d 256: for trying the GPU scripts on a CPU

Weights are drawn on the GPU when there is one (seconds for 8B), scaled so activations stay O(1) (linear layers
N(0, 1/fan_in), norm gains 1 + N(0, 0.1^2)), and written with models.checkpoint.save_checkpoint (llama, or
nemotron-nas block_configs when layers differ) together with a small byte-level tokenizer, so onnxruntime-genai's
model builder and exporters.export both read the folder.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from models.checkpoint import save_checkpoint
from models.config import DecoderConfig, LayerSpec
from models.decoder import PuzzleDecoder
from models.tokenizers import byte_level_tokenizer, save_tokenizer
from passes.support.errors import fail, run_cli
from passes.support.outputs import check_output_folder

SHAPES = {   # name: (layers, hidden, FFN width, heads, KV heads, vocab); "-puzzle": attention removed in the middle half
    "llama8b": (32, 4096, 14336, 32, 8, 128256),
    "mini": (8, 256, 768, 4, 2, 512),            # for trying the GPU scripts on a CPU
}


def shape(name: str) -> DecoderConfig:
    base = name.removesuffix("-puzzle")
    if base not in SHAPES:
        fail(f"unknown shape {name!r} (choose from {', '.join(f'{s}, {s}-puzzle' for s in SHAPES)})")
    n, d, m, heads, kv, vocab = SHAPES[base]
    puzzle = name.endswith("-puzzle")
    layers = [LayerSpec(not (puzzle and n // 4 <= i < 3 * n // 4), m) for i in range(n)]
    return DecoderConfig(vocab_size=vocab, hidden_size=d, num_heads=heads, num_kv_heads=kv, head_dim=d // heads,
                         layers=layers, rms_norm_eps=1e-5, rope_theta=500000.0)


@torch.no_grad()
def random_model(config: DecoderConfig, dtype: torch.dtype, device: str, seed: int = 0) -> PuzzleDecoder:
    """A PuzzleDecoder with seeded random weights drawn on `device`, returned on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = PuzzleDecoder(config)
    weights = {}
    for name, param in model.state_dict().items():
        noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
        if name.endswith("norm.weight"):
            noise = noise.mul_(0.1).add_(1.0)
        elif name != "embed_tokens.weight":
            noise = noise.mul_(param.shape[1] ** -0.5)
        weights[name] = noise.to(dtype).cpu()
    model.load_state_dict(weights, assign=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", help="llama8b, llama8b-puzzle, mini or mini-puzzle")
    parser.add_argument("-o", "--output", required=True, help="new HF checkpoint folder")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    args = parser.parse_args(argv)
    out = Path(args.output)
    check_output_folder(out)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(shape(args.shape), {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype], device)
    save_checkpoint(model, out)
    save_tokenizer(byte_level_tokenizer(), out)
    print(f"{args.shape}: {model.num_parameters() / 1e9:.2f} B parameters ({args.dtype}, drawn on {device}) -> {out} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
