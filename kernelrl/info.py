"""``kernelrl.info()`` and ``kernelrl info``: what this machine offers, and for each op,
device and dtype the backend used and where that choice came from.

The sources, in the order dispatch consults them (:mod:`kernelrl.backend`):
    forced (KERNELRL_BACKEND=...)            the environment variable names a backend
    tuned on this machine (date, times)     ``kernelrl tune`` measured it here
    built-in table (GPU, date, times)       the table shipped with kernelrl
    default order                           the fixed order and its skip rules

This module imports neither torch nor the ops at import time (``kernelrl --help`` stays
fast); :func:`info` does.
"""

from __future__ import annotations

import os
import platform

__all__ = ["info", "format_info", "format_ms"]

_DTYPES = ("float32", "bfloat16")


def format_ms(ms) -> str:
    if not isinstance(ms, (int, float)):
        return str(ms)
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def _timings(entry: dict) -> str:
    """``native 12.3 ms vs torch 20.1 ms``: the choice first, then the others by time."""
    times = entry.get("median_ms") or {}
    choice = entry["choice"]
    order = [choice] + sorted((b for b in times if b != choice), key=lambda b: times[b])
    parts = [f"{b} {format_ms(times[b])}" for b in order if b in times]
    text = " vs ".join(parts)
    rejected = sorted(entry.get("rejected") or {})
    if rejected:
        text += ("; " if text else "") + f"rejected by the check: {', '.join(rejected)}"
    return text


def _entry_source(kind: str, entry: dict, device_name: str) -> str:
    details = [entry.get("date", "undated")]
    timings = _timings(entry)
    if timings:
        details.append(timings)
    if kind == "tuned":
        return f"tuned on this machine ({', '.join(details)})"
    return f"built-in table ({device_name}, {', '.join(details)})"


def _choice(backend, spec, device, dtype, forced, forced_error) -> dict:
    """The backend used for one (op, device, dtype), and a sentence saying why."""
    if forced_error:
        return {"backend": None, "kind": "error",
                "source": f"{forced_error}; calls raise BackendError"}
    if forced and forced not in spec.impls:
        return {"backend": "torch", "kind": "forced",
                "source": f"torch: KERNELRL_BACKEND={forced} is ignored, {spec.name} has no "
                          f"{forced} implementation"}
    if forced:
        ok, why = backend.availability(forced, device, dtype, spec)
        if ok:
            return {"backend": forced, "kind": "forced",
                    "source": f"forced (KERNELRL_BACKEND={forced})"}
        return {"backend": None, "kind": "forced-unavailable",
                "source": f"forced (KERNELRL_BACKEND={forced}) but {forced} cannot run here: "
                          f"{why}; calls raise BackendError"}
    decision = backend.decide(spec.name, device, dtype)
    if decision.source in ("tuned", "built-in"):
        source = _entry_source(decision.source, decision.entry, backend.device_name(device))
    else:
        source = "default order"
        tuned = decision.entry
        if tuned:
            ok, why = backend.availability(tuned["choice"], device, dtype, spec)
            source += (f" (tuned choice {tuned['choice']} cannot run here: {why}"
                       + (f"; not using {', '.join(sorted(tuned['rejected']))}, rejected by "
                          "the tune check" if tuned.get("rejected") else "") + ")")
    return {"backend": decision.backend, "kind": decision.source, "source": source}


def _rows(backend, spec, device, gpu_present: bool) -> list[dict]:
    """Each backend tried on ``device``, whether it can run here, and why not."""
    import torch

    rows = []
    dtype = next((d for d in (torch.bfloat16, torch.float32) if all(
        d in spec.dtypes[b] for b in spec.dtypes if b != "torch")), torch.float32)
    for name in backend._ORDER.get(device.type, ("torch",)):
        if name not in spec.dtypes:
            continue
        if device.type == "cuda" and not gpu_present and name != "native":
            ok, why = False, "no CUDA device"
        else:
            ok, why = backend.availability(name, device, dtype, spec)
        skipped = spec.skip.get((name, device.type))
        if ok and skipped:
            status, why = "skipped", f"by default: {skipped}"
        else:
            status = "available" if ok else "unavailable"
            if skipped:
                why = f"{why}; and by default skipped: {skipped}"
        rows.append({"backend": name, "status": status, "reason": why})
    return rows


def _dtypes_for(spec, per_device_entries: list[dict]) -> list[str]:
    names = list(_DTYPES)
    for entries in per_device_entries:
        names += [d for d in entries if d not in names]
    return names


def info() -> dict:
    """What this machine offers and which backend each op uses, with reasons.

    Returns a dict; ``kernelrl info`` prints it. Loads the native module (recording its
    error if it fails) but touches no GPU beyond asking torch whether one exists and its
    name. Never raises for a bad ``KERNELRL_BACKEND``: the report says what is wrong.
    """
    import torch

    import kernelrl.ops  # noqa: F401  (registers every op)
    from kernelrl import backend
    from kernelrl._version import __version__

    module, native_why = backend._native_status()
    triton_ok, triton_why = backend._triton_status()
    config = backend._build_config()
    gpu = torch.cuda.is_available()
    raw_forced = (os.environ.get("KERNELRL_BACKEND") or "").strip() or None
    try:
        forced, forced_error = backend.forced_backend(), None
    except backend.BackendError:
        forced = None
        forced_error = (f"KERNELRL_BACKEND={raw_forced!r} is invalid "
                        f"(valid: {', '.join(backend.BACKENDS)}, or unset)")
    tuned = backend.tuned_file()
    report = {
        "kernelrl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_why if triton_ok else f"unavailable: {triton_why}",
        "native": native_why,
        "native_cuda": bool(module is not None and module.has_cuda()),
        "build": None if config is None else {
            "native": getattr(config, "BUILD_NATIVE", None),
            "cuda": getattr(config, "BUILD_CUDA", None)},
        "cpu": backend.cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "forced_backend": raw_forced,
        "forced_backend_error": forced_error,
        "triton_interpret": backend.triton_interpret(),
        "tuned": {"path": str(tuned.path), "exists": tuned.exists, "problem": tuned.problem,
                  "entries": sum(len(per_dtype) for per_op in tuned.entries.values()
                                 for per_dtype in per_op.values())},
        "ops": {},
    }
    builtin = backend.builtin_table()
    for name, spec in sorted(backend.registered_ops().items()):
        report["ops"][name] = {}
        for dev in ("cpu", "cuda"):
            device = torch.device(dev)
            rows = _rows(backend, spec, device, gpu)
            if dev == "cuda" and not gpu:
                choices = {"-": {"backend": None, "kind": "no device",
                                 "source": "no CUDA device on this machine"}}
            else:
                model = backend.device_name(device)
                dtypes = _dtypes_for(spec, [table.get(name, {}).get(model, {})
                                            for table in (tuned.entries, builtin)])
                choices = {d: _choice(backend, spec, device, getattr(torch, d), forced,
                                      forced_error) for d in dtypes}
            report["ops"][name][dev] = {"choices": choices, "backends": rows}
    return report


def format_info(report: dict) -> str:
    """The report of :func:`info` as text (what ``kernelrl info`` prints)."""
    build = report.get("build")
    if build is None:
        build_line = "no install record (kernelrl._build_config missing: a plain checkout?)"
    else:
        build_line = (f"KERNELRL_BUILD_NATIVE={'1' if build['native'] else '0'}, "
                      f"KERNELRL_BUILD_CUDA={build['cuda']}")
    tuned = report["tuned"]
    if tuned["problem"]:
        tuned_line = f"{tuned['path']}: {tuned['problem']}"
    elif tuned["exists"]:
        tuned_line = f"{tuned['path']} ({tuned['entries']} entries)"
    else:
        tuned_line = f"{tuned['path']} (not written yet; `kernelrl tune` writes it)"
    lines = [f"kernelrl {report['kernelrl']}  (python {report['python']})",
             f"  torch   {report['torch']}",
             f"  triton  {report['triton']}",
             f"  native  {report['native']}; CUDA kernels: "
             f"{'built' if report['native_cuda'] else 'not built'}",
             f"  build   {build_line}",
             f"  cpu     {report['cpu']}",
             f"  gpu     {report['gpu'] or 'none'}",
             f"  tuned   {tuned_line}"]
    if report["forced_backend_error"]:
        lines.append(f"  {report['forced_backend_error']}")
    elif report["forced_backend"]:
        lines.append(f"  KERNELRL_BACKEND={report['forced_backend']} (forced)")
    if report["triton_interpret"]:
        lines.append("  TRITON_INTERPRET=1 (Triton runs on CPU tensors when forced)")
    lines.append("ops (backend per device and dtype, and where the choice came from; "
                 "* marks a backend in use):")
    for name, per_device in report["ops"].items():
        lines.append(f"  {name}")
        for dev, plan in per_device.items():
            used = {c["backend"] for c in plan["choices"].values()}
            label = dev
            for dtype, choice in plan["choices"].items():
                lines.append(f"    {label:<5} {dtype:<9} {choice['backend'] or '-':<7} "
                             f"{choice['source']}")
                label = ""
            for row in plan["backends"]:
                mark = "*" if row["backend"] in used else " "
                lines.append(f"          {mark} {row['backend']:<7} {row['status']:<12}"
                             f"{row['reason']}")
    return "\n".join(lines)
