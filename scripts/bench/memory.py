"""Largest pretraining batch per GPU, computed (not measured) from what one step keeps in memory.

For each preset and input size, one bf16-autocast forward pass is run on the CPU while a
``saved_tensors_hooks`` pair adds up the bytes autograd keeps for the backward pass (the activations);
with ``--grad-checkpointing`` only block inputs are kept. Static memory is fp32 weights + gradients +
two AdamW moments (16 bytes per parameter) plus the batch-independent bf16 weight copies autocast keeps
(per-sample and fixed parts separated by running batches of 2 and 4). The largest batch is then

    floor((usable GPU memory - static) / activations per sample)

with ``usable = 0.9 x`` the card's memory (allocator fragmentation, CUDA context, workspace). On a GPU the
figures should be confirmed with ``torch.cuda.max_memory_allocated``; this script says which it did.

    python scripts/bench/memory.py --gpu-gib 80 --json docs/bench_memory.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from medmae.models import build_mae, mae_config


def saved_bytes(preset: str, roi: int, grad_checkpointing: bool, batch: int) -> tuple[int, int]:
    """Bytes autograd saves for one masked forward of ``batch`` samples, and the parameter count."""
    model = build_mae(mae_config(preset, patch_size=16), grad_checkpointing=grad_checkpointing).train()
    volume = torch.randn(batch, 1, roi, roi, roi)
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()  # count each storage once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(volume, generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in model.parameters())
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(nbytes for ptr, nbytes in seen.items() if ptr not in parameter_storages), params


def activation_bytes(preset: str, roi: int, grad_checkpointing: bool) -> tuple[float, float, int]:
    """Per-sample activation bytes and the batch-independent part (bf16 weight copies kept by autocast),
    from the difference between batches of 4 and 2; and the parameter count."""
    two, params = saved_bytes(preset, roi, grad_checkpointing, 2)
    four, _ = saved_bytes(preset, roi, grad_checkpointing, 4)
    per_sample = (four - two) / 2
    return per_sample, max(0.0, two - 2 * per_sample), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["base", "large"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 128])
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory (H100: 80)")
    parser.add_argument("--json", type=Path, default=Path("docs/bench_memory.json"))
    args = parser.parse_args()
    usable = 0.9 * args.gpu_gib * 2**30
    rows = []
    print(f"computed on the CPU (bf16 autocast activations; fp32 weights, grads, AdamW): {args.gpu_gib:g} GiB GPU")
    print(
        f"{'preset':<7}{'input':>7}{'ckpt':>6}{'params M':>10}{'static GiB':>12}{'act MiB/sample':>16}{'max batch':>11}"
    )
    for preset in args.presets:
        for roi in args.sizes:
            for checkpointing in (False, True):
                per_sample, fixed, params = activation_bytes(preset, roi, checkpointing)
                static = 16 * params + fixed
                max_batch = int((usable - static) // per_sample)
                row = {
                    "preset": preset,
                    "input": roi,
                    "grad_checkpointing": checkpointing,
                    "params": params,
                    "static_gib": static / 2**30,
                    "activation_mib_per_sample": per_sample / 2**20,
                    "max_batch": max_batch,
                    "how": "computed on CPU",
                }
                rows.append(row)
                print(
                    f"{preset:<7}{roi:>6}³{'yes' if checkpointing else 'no':>6}{params / 1e6:>10.1f}"
                    f"{row['static_gib']:>12.2f}{row['activation_mib_per_sample']:>16.1f}{max_batch:>11d}"
                )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"gpu_gib": args.gpu_gib, "usable_fraction": 0.9, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
