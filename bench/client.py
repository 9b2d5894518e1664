"""Client benchmark: an NF4 4-bit base against an fp32 base of the same model, in one run.

For each variant, in a subprocess of its own (so that the RSS peaks of the two never mix): load the model from a
local directory, wrap it in the FedALT layer (rank 8 on q/v, learned mixer), and run training steps through the
real trainer. Measured:

* weight memory: every parameter and buffer plus bitsandbytes' quantization state (``weight_bytes``);
* peak RSS of the process, and separately while loading and while training (the kernel's peak counter is reset
  in between through ``/proc/self/clear_refs``), and the same above the RSS right after the imports;
* training step time: the median of the steps after a warm-up one (forward, backward, AdamW; gradient
  checkpointing on, as in the default and edge profiles).

    .venv/bin/python bench/client.py --json        # hidden 1536, 12 layers (340 M parameters), ~2 minutes
    .venv/bin/python bench/client.py --quick --json

Both variants run with the client's defaults: NF4 computes in ``auto`` (bf16 where the CPU has bf16 units,
client/profiles.py) and its load pins glibc's mmap threshold at 8 MiB (client/model.py); the fp32 base is fp32
and unpinned. ``--compute-dtype float32`` and ``--mmap-threshold-mib 0`` (neither pinned) give the previous
settings; ``--mmap-threshold-mib N`` pins both variants at N MiB (``--pin-mmap-threshold``: 1 MiB).
``--transformers-load`` loads NF4 through transformers' own memory-mapped path (the loader before the streamed
one) for comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Large enough that the weights, not the ~0.4 GB of Python + torch + transformers, dominate both processes: 340 M
# parameters, 1.36 GB in fp32 (the char tokenizer's 99-token vocabulary keeps nearly all of them in linear layers).
FULL = {"hidden_size": 1536, "num_layers": 12, "num_heads": 12, "intermediate_size": 4096}
QUICK = {"hidden_size": 256, "num_layers": 2, "num_heads": 4, "intermediate_size": 512}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status("VmRSS")


def getrusage_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM), Linux >= 4.0; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    """One variant in this process; prints one JSON line."""
    import random
    import string

    if args.mmap_threshold_mib:  # both variants, before torch allocates: big blocks mmapped from now on
        from fedquic.common.heap import pin_mmap_threshold

        pin_mmap_threshold(int(args.mmap_threshold_mib * (1 << 20)))

    import torch
    from fedquic.client.data import Example
    from fedquic.client.fedalt import FedALTModel, LoraSpec
    from fedquic.client.model import LoadSpec, load_base_model, weight_bytes
    from fedquic.client.trainer import TrainConfig, train_local

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.transformers_load:  # no safetensors files found: load_base_model falls back to from_pretrained(path)
        import fedquic.client.model as model_mod

        model_mod.safetensors_files = lambda path: None
    baseline = rss_bytes()
    t0 = time.perf_counter()
    quant = "nf4" if args.worker == "nf4" else "none"
    # the client's defaults unless overridden: a quantized load pins the mmap threshold itself (client/model.py)
    pin = {} if args.mmap_threshold_mib is None else {"mmap_threshold_mib": args.mmap_threshold_mib or None}
    spec = LoadSpec(quantization=quant, compute_dtype=args.compute_dtype, gradient_checkpointing=True, **pin)
    model, tok = load_base_model(Path(args.model_dir), spec)
    load_s = time.perf_counter() - t0
    gc.collect()
    if args.trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed load-time buffers back to the OS
    rss_loaded, anon_loaded = rss_bytes(), _status("RssAnon")
    load_peak = _status("VmHWM")
    can_reset = reset_peak_rss()
    wbytes = weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    fam = FedALTModel(model, LoraSpec(rank=8), init_seed=0, mixer="learned")
    rng = random.Random(0)

    def text(n: int) -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=n))

    half = args.seq_len // 2
    examples = [Example(prompt=text(half), response=text(half)) for _ in range(64)]
    stamps: list[float] = []
    cfg = TrainConfig(
        steps=args.steps + 1, lr=1e-3, batch_size=args.batch_size, max_len=args.seq_len, eval_samples=1, seed=0
    )
    start = time.perf_counter()
    train_local(fam, examples, tok, cfg, progress=lambda step, total, loss: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    out = {
        "variant": args.worker,
        "params": params,
        "weight_bytes": wbytes,
        "rss_baseline": baseline,
        # clear_refs resets ru_maxrss too: the process's peak is the larger of the two phases' peaks
        "peak_rss": max(load_peak, _status("VmHWM")) if can_reset else getrusage_peak(),
        "load_peak_rss": load_peak,
        "train_peak_rss": _status("VmHWM") if can_reset else None,
        "rss_after_load": rss_loaded,
        "anon_rss_after_load": anon_loaded,
        "load_s": load_s,
        "first_step_s": steps[0],
        "step_s": statistics.median(steps[1:]),
        "steps": len(steps) - 1,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out))


def run_variant(variant: str, model_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--model-dir", str(model_dir)]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    cmd += ["--threads", str(args.threads), *([] if args.trim else ["--no-trim"])]
    cmd += ["--transformers-load"] if args.transformers_load else []
    cmd += [] if args.mmap_threshold_mib is None else ["--mmap-threshold-mib", str(args.mmap_threshold_mib)]
    # the compute dtype is NF4's (what its dequantized weights and matmuls use); the fp32 base stays fp32
    cmd += ["--compute-dtype", args.compute_dtype if variant == "nf4" else "float32"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--quick", action="store_true", help="a small model and two steps (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up one (default 4, quick 2)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the built model here")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the full model (default 12: 340 M)")
    ap.add_argument("--no-trim", dest="trim", action="store_false", help="skip malloc_trim after loading")
    ap.add_argument(
        "--transformers-load",
        action="store_true",
        help="load NF4 through transformers' own memory-mapped path (the loader before the streamed one)",
    )
    ap.add_argument(
        "--mmap-threshold-mib",
        type=float,
        default=None,
        help="both variants: pin glibc's mmap threshold at this size; 0: neither (default: the client's, NF4 8 MiB)",
    )
    ap.add_argument(
        "--pin-mmap-threshold",
        dest="mmap_threshold_mib",
        action="store_const",
        const=1.0,
        help="the same as --mmap-threshold-mib 1",
    )
    ap.add_argument(
        "--compute-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="NF4's compute dtype (default: the client's auto, bf16 where the CPU has bf16 units; fp32 stays fp32)",
    )
    ap.add_argument("--worker", choices=("nf4", "fp32"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compute_dtype == "auto":
        from fedquic.client.profiles import native_compute_dtype

        args.compute_dtype = native_compute_dtype("cpu")
    if args.steps is None:
        args.steps = 2 if args.quick else 4
    if args.worker:
        worker(args)
        return

    from fedquic.client.model import build_tiny_llama

    shape = QUICK if args.quick else FULL
    if args.layers is not None:
        shape = {**shape, "num_layers": args.layers}
    with tempfile.TemporaryDirectory(prefix="fedquic-bench-client-") as tmp:
        model_dir = args.model_dir or Path(tmp) / "model"
        t0 = time.perf_counter()
        build_tiny_llama(model_dir, seed=0, max_position=max(256, args.seq_len), **shape)
        build_s = time.perf_counter() - t0
        res = {v: run_variant(v, model_dir, args) for v in ("fp32", "nf4")}
    q, f = res["nf4"], res["fp32"]
    summary = {
        "model": {**shape, "params": f["params"], "batch_size": args.batch_size, "seq_len": args.seq_len},
        "quick": args.quick,
        "nf4_loader": "transformers" if args.transformers_load else "streamed",
        "mmap_threshold_mib": args.mmap_threshold_mib,  # None: the client's default (NF4 loads pin 8 MiB)
        "compute_dtype_4bit": args.compute_dtype,
        "build_s": round(build_s, 2),
        "weight_bytes_4bit": q["weight_bytes"],
        "weight_bytes_fp32": f["weight_bytes"],
        "weight_bytes_4bit_vs_fp32": q["weight_bytes"] / f["weight_bytes"],
        "peak_rss_4bit": q["peak_rss"],
        "peak_rss_fp32": f["peak_rss"],
        "peak_rss_4bit_vs_fp32": q["peak_rss"] / f["peak_rss"],
        "peak_rss_above_imports_4bit_vs_fp32": (q["peak_rss"] - q["rss_baseline"])
        / max(f["peak_rss"] - f["rss_baseline"], 1),
        "train_peak_rss_4bit": q["train_peak_rss"],
        "train_peak_rss_fp32": f["train_peak_rss"],
        "train_peak_rss_4bit_vs_fp32": q["train_peak_rss"] / f["train_peak_rss"] if f["train_peak_rss"] else None,
        "load_peak_rss_4bit": q["load_peak_rss"],
        "load_peak_rss_fp32": f["load_peak_rss"],
        "load_peak_rss_4bit_vs_fp32": q["load_peak_rss"] / f["load_peak_rss"],
        # what loading adds to the process: fp32 maps its checkpoint lazily, so this is mostly the NF4 load's cost
        "load_peak_rss_above_imports_4bit": q["load_peak_rss"] - q["rss_baseline"],
        "load_peak_rss_above_imports_fp32": f["load_peak_rss"] - f["rss_baseline"],
        "rss_after_load_4bit": q["rss_after_load"],
        "rss_after_load_fp32": f["rss_after_load"],
        "rss_after_load_4bit_vs_fp32": q["rss_after_load"] / f["rss_after_load"],
        "rss_after_imports": f["rss_baseline"],
        "step_s_4bit": q["step_s"],
        "step_s_fp32": f["step_s"],
        "step_time_4bit_vs_fp32": q["step_s"] / f["step_s"],
        "load_s_4bit": q["load_s"],
        "load_s_fp32": f["load_s"],
        "threads": q["threads"],
        "steps_timed": q["steps"],
    }
    mib = 1 << 20
    print(f"model: hidden {shape['hidden_size']}, {shape['num_layers']} layers, {f['params'] / 1e6:.1f} M parameters")
    print(f"{'':<24}{'fp32':>12}{'nf4':>12}{'nf4/fp32':>10}")
    for name, key, scale, unit in (
        ("weights", "weight_bytes", mib, "MiB"),
        ("peak RSS", "peak_rss", mib, "MiB"),
        ("  while loading", "load_peak_rss", mib, "MiB"),
        ("  while training", "train_peak_rss", mib, "MiB"),
        ("training step", "step_s", 1, "s"),
        ("load", "load_s", 1, "s"),
    ):
        print(f"{name + ' (' + unit + ')':<24}{f[key] / scale:>12.2f}{q[key] / scale:>12.2f}{q[key] / f[key]:>10.3f}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
