"""Pretraining step time: medmae's MAE against MONAI's MaskedAutoEncoderViT, same sizes, same run.

For each preset (small, base): batch 2 of 1x96^3, 16^3 patches, 75 % masked, fp32, the same masked-patch
MSE and the same AdamW step for both models (medmae computes it as its training step does, with
``MaskedAutoencoder3D.loss``: head and targets of the masked patches only; the value is the same). Each
(model, preset) runs in its own subprocess so its peak resident memory is its own, ``--rounds`` times,
interleaved with the other model's runs so that drifting machine load hits both alike. Also measured in
the same run: the FLOPs of one step (PyTorch's FlopCounterMode) and the machine's fp32 matmul peak,
giving the fraction of peak each step reaches.

    python scripts/bench/pretrain_step.py                      # small and base, table + JSON
    python scripts/bench/pretrain_step.py --presets small --steps 12 --json /tmp/bench.json
    python scripts/bench/pretrain_step.py --presets base --sizes 64 96 128 160 --json docs/bench_sizes.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PATCH = 16
BATCH = 2
RATIO = 0.75


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of a square matmul: the reference 'peak' of this machine."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def build(kind: str, preset: str, size: int):
    """The model and a step function ``step() -> loss`` doing forward, loss, backward and AdamW."""
    from medmae.models import build_mae, mae_config
    from medmae.models.mae import masked_mse
    from medmae.models.patching import patchify

    config = mae_config(preset, patch_size=PATCH)
    roi = (size, size, size)
    volume = torch.randn(BATCH, 1, *roi)
    if kind == "medmae":
        model = build_mae(config)
        generator = torch.Generator().manual_seed(0)
        params = [p for p in model.parameters() if p.requires_grad]

        def forward() -> torch.Tensor:  # what medmae's training step calls
            return model.loss(volume, generator=generator)

    else:
        from monai.networks.nets import MaskedAutoEncoderViT

        model = MaskedAutoEncoderViT(
            in_channels=1,
            img_size=roi,
            patch_size=PATCH,
            hidden_size=config.hidden_size,
            mlp_dim=config.mlp_dim,
            num_layers=config.depth,
            num_heads=config.num_heads,
            masking_ratio=RATIO,
            decoder_hidden_size=config.decoder_dim,
            decoder_mlp_dim=config.decoder_mlp_dim,
            decoder_num_layers=config.decoder_depth,
            decoder_num_heads=config.decoder_heads,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        target = patchify(volume, (PATCH,) * 3)

        def forward() -> torch.Tensor:
            pred, mask = model(volume)
            return masked_mse(pred, target, mask.bool())

    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True)

    def step() -> torch.Tensor:
        loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return model, forward, step


def count_cpu_attention() -> None:
    """Give FlopCounterMode the formulas of PyTorch's CPU attention kernels: it has the GPU ones only, so CPU
    counts would leave attention out."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    pairs = (
        (aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
        (aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop),
    )
    for op, formula in pairs:
        if op not in flop_counter.flop_registry:  # the formulas are already shape-wrapped: register them raw
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


def count_step_flops(forward) -> float:
    """FLOPs of one forward + backward (matmuls, convolutions, attention) by PyTorch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention()

    counter = FlopCounterMode(display=False)
    with counter:
        forward().backward()
    return float(counter.get_total_flops())


def run_one(kind: str, preset: str, size: int, steps: int, warmup: int) -> dict:
    """Time one (model, preset, input size) in this process; returns the measurements."""
    torch.manual_seed(0)
    model, forward, step = build(kind, preset, size)
    flops = count_step_flops(forward)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "model": kind,
        "preset": preset,
        "size": size,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "steps": steps,
        "flops_per_step": flops,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def baseline_rss_mb() -> float:
    """Peak RSS of a process that only imports the libraries (subtracted to compare models)."""
    import monai.networks.nets  # noqa: F401

    import medmae.models  # noqa: F401

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved_rounds(preset: str, size: int, rounds: int, options: list[str]) -> dict[str, dict]:
    """Each model ``rounds`` times, alternating which goes first, so drifting machine load hits both alike.
    A row's ``median_s`` is the median over rounds of each round's median step; peak RSS is the largest."""
    runs: dict[str, list[dict]] = {"monai": [], "medmae": []}
    for index in range(rounds):
        order = ("monai", "medmae") if index % 2 == 0 else ("medmae", "monai")
        for kind in order:
            runs[kind].append(in_subprocess(["--one", kind, preset, str(size), *options]))
    pair = {}
    for kind, results in runs.items():
        row = dict(results[0])
        row["round_medians_s"] = [r["median_s"] for r in results]
        row["median_s"] = statistics.median(row["round_medians_s"])
        row["min_s"] = min(r["min_s"] for r in results)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
        pair[kind] = row
    return pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "base"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[96], help="cube input sizes")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of each model (median reported)")
    parser.add_argument("--json", type=Path, default=Path("docs/bench_pretrain_step.json"))
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "PRESET", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), args.steps, args.warmup)))
        return
    if args.baseline:
        print(json.dumps({"rss_mb": baseline_rss_mb()}))
        return

    peak = matmul_peak_gflops()
    base_rss = in_subprocess(["--baseline"])["rss_mb"]
    rows = []
    options = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    for preset in args.presets:
        for size in args.sizes:
            pair = interleaved_rounds(preset, size, args.rounds, options)
            for row in pair.values():
                row["gflops_per_s"] = row["flops_per_step"] / row["median_s"] / 1e9
                row["fraction_of_peak"] = row["gflops_per_s"] / peak
                row["model_rss_mb"] = row["peak_rss_mb"] - base_rss
            ratios = [m / o for m, o in zip(pair["monai"]["round_medians_s"], pair["medmae"]["round_medians_s"])]
            pair["medmae"]["speedup_vs_monai"] = pair["monai"]["median_s"] / pair["medmae"]["median_s"]
            pair["medmae"]["speedup_per_round"] = ratios
            rows += [pair["monai"], pair["medmae"]]

    header = (
        f"{'preset':<7}{'input':>6} {'model':<8}{'step s':>8}{'GFLOP/step':>12}{'GFLOP/s':>9}"
        f"{'% peak':>8}{'peak MB':>9}{'speedup':>9}"
    )
    print(
        f"fp32 CPU, batch {BATCH} x 1 channel, patch {PATCH}^3, {int(RATIO * 100)}% masked; "
        f"matmul peak {peak:.1f} GFLOP/s; {torch.get_num_threads()} threads; torch {torch.__version__}"
    )
    print(header)
    for r in rows:
        speedup = f"{r['speedup_vs_monai']:.2f}x" if "speedup_vs_monai" in r else ""
        print(
            f"{r['preset']:<7}{r['size']:>5}³ {r['model']:<8}{r['median_s']:>8.3f}{r['flops_per_step'] / 1e9:>12.1f}"
            f"{r['gflops_per_s']:>9.1f}{100 * r['fraction_of_peak']:>7.0f}%{r['model_rss_mb']:>9.0f}{speedup:>9}"
        )
        if "speedup_per_round" in r:
            print(f"{'':<14}speed-up per round: {', '.join(f'{x:.2f}x' for x in r['speedup_per_round'])}")
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "torch": torch.__version__,
        "matmul_peak_gflops": peak,
        "import_baseline_rss_mb": base_rss,
        "config": {
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch": BATCH,
            "sizes": args.sizes,
            "patch": PATCH,
            "mask_ratio": RATIO,
            "dtype": "float32",
        },
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
