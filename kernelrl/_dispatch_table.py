"""Built-in dispatch table: measured backend choices per GPU model, shipped with kernelrl.

Consulted after this machine's tuned file and before the default order (kernelrl.backend).
TABLE[op][GPU model name][dtype name] is an entry as ``kernelrl tune`` writes it:
{"choice": backend, "date": "YYYY-MM-DD", "median_ms": {backend: ms}, "errors": {...},
"rejected": {backend: why}, ...}.

Seeded from a tune run on a GPU, from a checkout. benchmarks/gpu_check.sh runs
``kernelrl tune --device cuda --out benchmarks/results/tune-<gpu>-<date>.json``; then

    kernelrl tune --seed-builtin benchmarks/results/tune-<gpu>-<date>.json

merges that file's CUDA entries here (other GPUs' entries are kept).

This file is rewritten by ``--seed-builtin``; edit TABLE only through it.
"""

TABLE = {}
