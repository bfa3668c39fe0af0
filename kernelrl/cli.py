"""Command line: ``kernelrl demo | sft | rm | ppo | dpo | grpo | sample | info | tune |
bench`` (``python -m kernelrl ...`` is the same).

Building the parser imports nothing heavy: each subcommand imports its implementation
(and torch) only when it runs, so ``kernelrl --help`` and ``--version`` answer at once.
The trainers (``kernelrl sft ...``) get their arguments verbatim: each parses its own flags,
one per field of its config dataclass (``kernelrl sft --help``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from kernelrl._version import __version__


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _info(args: argparse.Namespace) -> int:
    from kernelrl.info import format_info, info

    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from kernelrl import tune as tuning

    try:
        if args.seed_builtin:
            count = tuning.seed_builtin(Path(args.seed_builtin))
            print(f"merged {count} CUDA entries from {args.seed_builtin} into the built-in "
                  f"table (kernelrl/_dispatch_table.py)")
            return 0
        result = tuning.tune(device=args.device, ops=_split(args.ops),
                             dtypes=_split(args.dtypes), reps=args.reps, budget=args.budget)
    except tuning.UsageError as exc:
        print(f"kernelrl tune: {exc}", file=sys.stderr)
        return 2
    path = tuning.write_tuned(result, also=Path(args.out) if args.out else None)
    print(tuning.summary(result))
    print(f"wrote {path}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def benchmarks_dir() -> Path:
    """The ``benchmarks`` folder beside the folder that holds the kernelrl package (a
    checkout or an editable install); a wheel install has none."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


BENCH_MISSING = """kernelrl bench: no benchmark suites here ({runner} not found).
The benchmark suites ship in the source repository's benchmarks/ folder, not in the
installed package. From a checkout of the repository:
    pip install -e .
    kernelrl bench --list                     (or: python benchmarks/run.py --list)"""


def bench(argv: list[str]) -> int:
    """``kernelrl bench ARGS...``: ``python <benchmarks>/run.py ARGS...``, its exit code."""
    runner = benchmarks_dir() / "run.py"
    if not runner.is_file():
        print(BENCH_MISSING.format(runner=runner), file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(runner), *argv])


#: trainer subcommand -> (module with main(argv, prog), one-line help)
TRAINERS = {
    "sft": ("kernelrl.train.sft", "supervised fine-tuning on demonstrations (InstructGPT step 1)"),
    "rm": ("kernelrl.train.rm", "reward model on ranked comparisons (InstructGPT step 2)"),
    "dpo": ("kernelrl.train.dpo", "direct preference optimization on preference pairs or "
                                  "rankings (DPO, IPO and variants)"),
    "grpo": ("kernelrl.train.grpo", "group relative policy optimization from a reward model or "
                                    "a Python reward function (GRPO, RLOO, DAPO, Dr. GRPO)"),
    "ppo": ("kernelrl.train.ppo", "PPO with a per-token KL penalty and a value function, from a "
                                  "reward model or a Python reward function (InstructGPT step 3)"),
    "sample": ("kernelrl.train.sample", "sample completions of a policy for a prompts file; "
                                        "--best-of N keeps the best by a reward model or function"),
    "demo": ("kernelrl.demo.pipeline", "the whole pipeline on a built-in task: SFT, reward model, "
                                       "PPO, DPO and best-of-N, compared on a gold rule"),
}


def train(name: str, argv: list[str]) -> int:
    """``kernelrl <trainer> ARGS...``: the trainer module's ``main(ARGS)``, its exit code."""
    import importlib

    module = importlib.import_module(TRAINERS[name][0])
    return module.main(argv, prog=f"kernelrl {name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelrl", description=(
        "kernelrl: a kernel-accelerated engine for LLM post-training."))
    parser.add_argument("--version", action="version", version=f"kernelrl {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, what) in TRAINERS.items():   # listed here; run through train() above
        trainer = sub.add_parser(name, help=f"{what}; `kernelrl {name} --help` for its flags",
                                 add_help=False)
        trainer.add_argument("args", nargs=argparse.REMAINDER,
                             help="the trainer's flags, passed on verbatim (default: none)")

    p_info = sub.add_parser(
        "info", help="versions, devices, and the backend each op uses (and why)",
        description="Versions, devices, and for each op, device and dtype the backend "
                    "used and where that choice came from (forced, tuned, built-in table, "
                    "default order).")
    p_info.add_argument("--json", action="store_true",
                        help="print the report as JSON (default: text)")
    p_info.set_defaults(func=_info)

    p_tune = sub.add_parser(
        "tune", help="check and time every backend here; dispatch then uses the fastest",
        description="Check each backend of each op against a float64 run, time those that "
                    "pass, and write the fastest per (op, device model, dtype) to the tuned "
                    "file in $KERNELRL_CACHE_DIR (default: $XDG_CACHE_HOME/kernelrl or "
                    "~/.cache/kernelrl), which dispatch reads.")
    p_tune.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device to tune; auto is cuda when torch sees a GPU, else cpu "
                             "(default: %(default)s)")
    p_tune.add_argument("--ops", metavar="NAME,...", default=None,
                        help="comma-separated ops to tune (default: every registered op)")
    p_tune.add_argument("--dtypes", metavar="DTYPE,...", default="float32,bfloat16",
                        help="comma-separated dtypes among float32, bfloat16, float16 "
                             "(default: %(default)s)")
    p_tune.add_argument("--reps", type=int, default=5, metavar="N",
                        help="timed runs per backend and example, after one warm-up; the "
                             "median counts (default: %(default)s)")
    p_tune.add_argument("--budget", type=float, default=10.0, metavar="SECONDS",
                        help="timing time per op and dtype, estimated from the checked run: "
                             "later examples are checked but not timed (default: %(default)s)")
    p_tune.add_argument("--out", metavar="FILE", default=None,
                        help="also write the tuned file's content to FILE "
                             "(default: only the cache file)")
    p_tune.add_argument("--seed-builtin", metavar="FILE", default=None,
                        help="tune nothing; merge the CUDA entries of FILE (from `kernelrl "
                             "tune --device cuda --out FILE` on a GPU) into the built-in table "
                             "kernelrl/_dispatch_table.py of this checkout (default: off)")
    p_tune.set_defaults(func=_tune)

    p_bench = sub.add_parser(
        "bench", help="run the benchmark suites: every argument goes to benchmarks/run.py",
        description="Runs `python benchmarks/run.py ARGS...` from the source checkout and "
                    "exits with its code; `kernelrl bench --help` shows run.py's options.")
    p_bench.add_argument("args", nargs=argparse.REMAINDER,
                         help="arguments for run.py, passed on verbatim (default: none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":           # verbatim, --help included
        return bench(argv[1:])
    if argv and argv[0] in TRAINERS:          # verbatim: the trainer parses its own flags
        return train(argv[0], argv[1:])
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
