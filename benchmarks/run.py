"""Run the benchmark suite: every family (``benchmarks/bench_<family>.py``) or those named.

    python benchmarks/run.py [FAMILY ...] [--full] [--device cpu|cuda|auto] [--out FILE]
                             [--impls A,B] [--cases X,Y] [--list]

``kernelrl bench ARGS...`` runs this file with ARGS, from the user's working directory, so
it depends on no particular cwd: paths are resolved from this file, and the default JSON
lands in the cwd.

By default the shapes are light (about seven minutes for all families on 2 CPU cores,
about a minute per op family, three for the training steps): enough
to rank the implementations and check that they agree, not the targets' shapes. ``--full``
runs the shapes the targets are stated at (minutes on a CPU). The table and targets go to
stdout, progress to stderr, and the JSON is always written: to --out, or to
./kernelrl-bench-<device>-<YYYY-MM-DD>.json, whose path is printed at the end.

Exit status: 0 when the run completed (failing implementations are error rows, targets are
reported, not asserted, and a family file that does not load is reported and left out);
1 when no family could be loaded; 2 for a bad argument (an unknown family, implementation
or case: the message lists the valid ones).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import progress  # noqa: E402
import suite  # noqa: E402
from cases import UsageError  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark kernelrl against eager torch, torch.compile and the peers "
                    "users would pick, on this machine.")
    p.add_argument("families", nargs="*", metavar="FAMILY",
                   help="families to run (default: all; see --list)")
    p.add_argument("--full", action="store_true",
                   help="the shapes the targets are stated at (minutes on a CPU)")
    suite.add_run_options(p)
    p.add_argument("--out", default=None,
                   help="JSON path (default: ./kernelrl-bench-<device>-<date>.json)")
    p.add_argument("--list", action="store_true", help="list families, cases and implementations")
    return p


def list_families(found: dict) -> str:
    loaded, broken = suite.load_families(found)
    lines = []
    for name, path in found.items():
        lines.append(f"{name}  ({path.name})")
        if name in broken:
            lines.append(f"  cannot run: {broken[name]}")
            continue
        module = loaded[name]
        lines += [f"  case {cid}: {title}" for cid, title in module.CASE_NAMES.items()]
        lines.append(f"  impls: {', '.join(module.IMPLS)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    found = suite.discover()
    if args.list:
        print(list_families(found))
        return 0
    unknown = [f for f in args.families if f not in found]
    if unknown:
        p.error(f"unknown family {', '.join(map(repr, unknown))}; valid choices: "
                f"{', '.join(found) or '(no benchmarks/bench_*.py found)'}")
    loaded, broken = suite.load_families({f: found[f] for f in (args.families or found)})
    for name, why in broken.items():
        progress.log(f"family {name} cannot run: {why}")
    if not loaded:
        print("run.py: no family could be loaded", file=sys.stderr)
        return 1
    families = list(loaded.values())
    try:
        impls, cases = suite.selection(families, args.impls, args.cases)
    except UsageError as e:
        p.error(str(e))
    device = common.resolve_device(args.device)
    out = args.out or (f"kernelrl-bench-{common.device_slug(device)}-"
                       f"{datetime.date.today().isoformat()}.json")
    rep = suite.run_suite(families, device=device, quick=not args.full, impls=impls,
                          cases=cases, reps=args.reps, warmup=args.warmup,
                          measure_memory=not args.no_mem, mem_repeats=args.mem_repeats,
                          mem_jobs=args.mem_jobs, family_errors=broken)
    path = suite.emit(rep, out)
    progress.log(f"wrote {path}")
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
