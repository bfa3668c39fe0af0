"""Running benchmark families: discovery, the options they share, the run over all their
cases under one progress bar, and the report (table and targets on stdout, JSON on disk).

A family is a file ``benchmarks/bench_<name>.py`` that defines

    BENCH         its name (<name>)
    CASE_NAMES    {case id: display name}
    IMPLS         every implementation name its cases may have (for --impls)
    plan(device, quick) -> [(case_id, shape, dtype)]   quick: the default, light shapes
    make_case(case_id, shape, dtype, device) -> cases.Case
    targets(report) -> [target dicts]    (``report`` holds only this family's rows)

and ends with ``sys.exit(suite.bench_main(sys.modules[__name__]))``, so that it runs on
its own and serves as the memory child (``--_child``). ``run.py`` runs several.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional

import common
import progress
import report
from cases import UsageError, check_names, parse_names, short_error
from timing import measure_ceilings


def discover(bench_dir: Path = common.BENCH_DIR) -> dict:
    """{family name: path} for every bench_<name>.py in ``bench_dir``, sorted by name."""
    return {p.stem[len("bench_"):]: p for p in sorted(Path(bench_dir).glob("bench_*.py"))}


REQUIRED = ("BENCH", "CASE_NAMES", "IMPLS", "plan", "make_case", "targets")


def load(path: Path):
    """Import a bench file as a module (its ``__main__`` block does not run)."""
    path = Path(path)
    if path.stem in sys.modules and getattr(sys.modules[path.stem], "__file__", None) == str(path):
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
    return module


def load_families(paths: dict) -> tuple:
    """({name: module}, {name: why}) for ``{name: path}``: a family that does not import
    or lacks one of :data:`REQUIRED` is reported, and the others still run (families are
    written by different people, at different times)."""
    loaded, broken = {}, {}
    for name, path in paths.items():
        try:
            module = load(path)
            missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
            if missing:
                raise AttributeError(f"{Path(path).name} defines no {', '.join(missing)}")
            loaded[name] = module
        except Exception as e:
            broken[name] = short_error(e)
    return loaded, broken


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options run.py and every bench file share."""
    p.add_argument("--device", default="auto",
                   help="cpu | cuda | auto (default: cuda if available)")
    p.add_argument("--impls", default=None,
                   help="comma list of implementations, e.g. kernelrl,eager")
    p.add_argument("--cases", default=None, help="comma list of case ids, e.g. token,linear")
    p.add_argument("--reps", type=int, default=5,
                   help="CPU: timed runs per implementation (median); targets need >= 5")
    p.add_argument("--warmup", type=int, default=1, help="CPU: warm-up runs, >= 1")
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--mem-repeats", type=int, default=None,
                   help="CPU: fresh processes per peak-memory figure, median reported "
                        "(default 1 for the default shapes, 3 with the full ones)")
    p.add_argument("--mem-jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="CPU: memory processes run at once (default: %(default)s)")


def selection(families: list, impls: Optional[str], cases: Optional[str]) -> tuple:
    """(implementation filter, case filter) from the comma lists, each None for "all".
    Raises UsageError listing the valid choices if a name is unknown to every family."""
    impl_names = parse_names(impls)
    case_names = parse_names(cases)
    check_names("--impls", impl_names, {n for f in families for n in f.IMPLS})
    check_names("--cases", case_names, {c for f in families for c in f.CASE_NAMES})
    return (set(impl_names) if impl_names else None), case_names


def _ceilings(device: str, quick: bool, earlier: Optional[dict]) -> dict:
    """The ceilings, measured now; with ``earlier`` (taken at the start of the run), the
    better of the two per figure. Load from other processes can only lower a ceiling, and
    a ceiling measured low puts rows above 100%, so the run measures at both ends."""
    progress.log("measuring ceilings" + (" (CPU figures)" if not common.is_cuda(device) else "")
                 + (" again, keeping the better" if earlier else ""))
    try:
        now = measure_ceilings(device, quick=quick)
    except Exception as e:
        now = {"copy_gbps": None, "bf16_tflops": None, "error": short_error(e)}
    if not earlier:
        return now
    best = dict(earlier)
    for key in ("copy_gbps", "bf16_tflops", "fp32_tflops"):
        values = [c[key] for c in (earlier, now) if c.get(key)]
        best[key] = max(values) if values else None
    best["measured"] = [{k: c.get(k) for k in ("copy_gbps", "bf16_tflops", "fp32_tflops")}
                        for c in (earlier, now)]
    best["note"] = f"{earlier.get('note', '')}; best of the start and the end of the run"
    return best


def run_suite(families: list, *, device: str, quick: bool, impls: Optional[set] = None,
              cases: Optional[list] = None, reps: int = 5, warmup: int = 1,
              measure_memory: bool = True, mem_repeats: Optional[int] = None,
              mem_jobs: int = 1, family_errors: Optional[dict] = None) -> dict:
    """Run the planned cases of ``families`` on ``device``; return the report (with each
    family's targets). ``quick``: the default shapes, else the target shapes (--full).
    ``family_errors``: {name: why} of families that could not be loaded, for the record."""
    import torch

    env = common.environment(device)
    env.update(size="default" if quick else "full", families=[f.BENCH for f in families],
               family_errors=dict(family_errors or {}))
    progress.log(f"device {env['device']}, torch {env['torch']}, triton {env['triton']}")
    ceilings = _ceilings(device, quick, None)
    mem_repeats = max(1, mem_repeats if mem_repeats is not None else (1 if quick else 3))
    planned = [(f, case_id, shape, dtype) for f in families
               for case_id, shape, dtype in f.plan(device, quick)
               if cases is None or case_id in cases]
    rows = []
    with progress.Bar(len(planned)) as bar:
        for i, (family, case_id, shape, dtype) in enumerate(planned, start=1):
            bar.case(i, f"{family.BENCH}:{case_id} {dtype}")
            try:
                case = family.make_case(case_id, shape, dtype, device)
            except Exception as e:
                progress.log(f"case {family.BENCH}:{case_id} {shape} {dtype}: "
                             f"ERROR {short_error(e)}")
                continue
            rows.extend(common.run_case(
                case, impls_filter=impls, warmup=warmup, reps=max(1, reps),
                measure_memory=measure_memory, child_script=family.__file__,
                mem_repeats=mem_repeats, mem_jobs=mem_jobs,
                # a fresh process recompiles torch.compile's graph: seconds per case, so
                # the default (light) run leaves that figure to --full
                mem_skip=frozenset({"compile"}) if quick else frozenset()))
            if common.is_cuda(device):
                torch.cuda.empty_cache()
    ceilings = _ceilings(device, quick, ceilings)
    rep = report.build_report(env, ceilings, rows)
    for family in families:
        view = dict(rep, results=[r for r in rep["results"] if r.get("bench") == family.BENCH])
        try:
            rep["targets"].extend(family.targets(view))
        except Exception as e:
            rep["targets"].append({"target": f"{family.BENCH} targets", "status": "NOT CHECKED",
                                   "detail": f"checking failed: {short_error(e)}"})
    return rep


def emit(rep: dict, out: Optional[str]) -> Optional[Path]:
    """Print the table, legend and targets on stdout; write the JSON to ``out`` if given.
    Returns the absolute path written."""
    print(report.format_table(rep))
    if rep.get("targets"):
        print()
        print(report.format_targets(rep["targets"]))
    if not out:
        return None
    path = Path(out).resolve()
    report.write_json(rep, path)
    return path


def bench_main(module, argv=None) -> int:
    """``python benchmarks/bench_<name>.py``: this one family, the target shapes unless
    --quick, the JSON only with --out. Also the memory child's entry (``--_child``)."""
    p = argparse.ArgumentParser(description=(module.__doc__ or "").split("\n")[0])
    add_run_options(p)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--quick", action="store_true",
                   help="the light default shapes of run.py (about a minute on 2 CPU cores)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return common.child_main(module.make_case, json.loads(args._child))
    try:
        impls, cases = selection([module], args.impls, args.cases)
    except UsageError as e:
        p.error(str(e))
    device = common.resolve_device(args.device)
    rep = run_suite([module], device=device, quick=args.quick, impls=impls, cases=cases,
                    reps=args.reps, warmup=args.warmup, measure_memory=not args.no_mem,
                    mem_repeats=args.mem_repeats, mem_jobs=args.mem_jobs)
    path = emit(rep, args.out)
    if path:
        progress.log(f"wrote {path}")
    return 0
