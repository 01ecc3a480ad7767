"""SymbolicTransformerRegressor speed: one fit once compiled, the first fit of a fresh process (with and without the
persistent compilation cache, which a user turns on with ``sr_jax.enable_compilation_cache()``), and B datasets in
one batched fit vs B separate fits.

    python benchmarks/sr_fit.py [--datasets 64] [--points 200] [--dim 2] [--sources prior,bases] [--model DIR]
                                [--n-prior 16] [--prior-draws 1024] [--skip-cold | --cold-only | --ablation]
                                [--phases] [--chunks] [--rounds R] [--compare-overlap R] [--json out.json]

Datasets come from the training generator (``--dim`` variables, noise-free). The separate fits and the batched fit
are each run once to trace/compile the shapes they need (timed; how many refinement programs are traced is
reported), then measured compiled in ``--rounds`` rounds (default 1) of the separate fits followed by the batched
fit; phases, chunks and R² are from the first round.

``--phases`` also reports where the compiled passes' seconds go: building the candidate pools (bases, the
transformer's decoding, prior screening), refinement, and selection with tidying (per dataset, in sympy/numpy).
A dataset is selected as soon as its refinement is final, inside the refinement call (while the device refines
the other datasets where it can), so "refine" is that call's wall time, selection included, and "select" the
seconds spent selecting, wherever they ran.

``--chunks`` also reports the compiled batched fit's refinement chunk by chunk (lockstep evaluations up to
``stop_at``, or ``reached`` where it ended early to move the candidates still running to a smaller tape, on a tape
of ``rows`` candidate rows: seconds, and the XLA temp buffer of each program from
``compiled.memory_analysis()``), and the system seconds and minor page faults (``getrusage``) of the compiled
separate fits and of the compiled batched fit. It waits for every chunk, so with ``--chunks`` nothing overlaps a
chunk (the estimator's selection of finished datasets runs between chunks): the batched fit's seconds then run high.

``--compare-overlap R`` instead times R rounds of the compiled batched fit with the host's work overlapping the
device's (the estimator's behaviour: selection of finished datasets during refinement, and with ``model`` in
``--sources`` the other candidates built during decoding) and without, alternating in one process.

``--ablation`` instead fits the datasets once (batched) with each part of the candidate pool alone and with the
whole pool (the transformer's parts only with ``--model``) and reports the share with R² > 0.99 on the training
rows and which source the chosen equations came from.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine_line  # noqa: E402
from core_jax.cli import int_at_least  # noqa: E402

_COLD = """
import sys, time
import numpy as np
t0 = time.perf_counter()
import sr_jax
from sr_jax import SymbolicTransformerRegressor
if {cache!r}:
    sr_jax.enable_compilation_cache()
from sr_jax.generator import GeneratorConfig, sample
t1 = time.perf_counter()
s = sample(0, GeneratorConfig(min_input_dimension={dim}, max_input_dimension={dim}, n_points={points}))
est = SymbolicTransformerRegressor(candidate_sources={sources!r}, model_path={model!r}, n_prior={n_prior},
                                   prior_draws={prior_draws}, random_state=0)
t2 = time.perf_counter(); est.fit(s.x_NxD, s.y_N); t3 = time.perf_counter()
est.fit(s.x_NxD, s.y_N); t4 = time.perf_counter()
print(t1 - t0, t3 - t2, t4 - t3)
"""


def datasets(n: int, dim: int, points: int):
    from sr_jax.generator import GeneratorConfig, sample

    cfg = GeneratorConfig(min_input_dimension=dim, max_input_dimension=dim, n_points=points)
    out = [sample(seed, cfg) for seed in range(n)]
    return [s.x_NxD for s in out], [s.y_N for s in out]


def cold_start(args, sources, cache: bool) -> dict:
    """import / first fit / second fit seconds in a fresh process; cache: a persistent cache warmed by a first run."""
    code = _COLD.format(dim=args.dim, points=args.points, sources=sources, model=args.model, cache=cache,
                        n_prior=args.n_prior, prior_draws=args.prior_draws)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, XDG_CACHE_HOME=tmp)
        runs = 2 if cache else 1  # the first run fills the cache, the second reads it
        for _ in range(runs):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parent.parent)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
    imp, first, second = (float(v) for v in out.stdout.split()[-3:])
    return {"import_s": imp, "first_fit_s": first, "second_fit_s": second}


def ablation(args, xs, ys) -> list[dict]:
    """One batched fit per part of the pool and one of the whole pool: R² > 0.99 share and the chosen sources."""
    from sr_jax import SymbolicTransformerRegressor

    parts = [("bases",), ("prior",)] + ([("model",)] if args.model else [])
    rows = []
    for sources in parts + [tuple(s for p in parts for s in p)]:
        est = SymbolicTransformerRegressor(candidate_sources=sources, model_path=args.model, n_prior=args.n_prior,
                                           prior_draws=args.prior_draws, random_state=0)
        t = time.perf_counter()
        est.fit(xs, ys)
        seconds = time.perf_counter() - t
        r2 = np.asarray(est.score(xs, ys))
        won = [e.source for e, ok in zip(est.best_, r2 > 0.99) if ok]
        rows.append({"sources": list(sources), "r2_gt_0.99": float(np.mean(r2 > 0.99)),
                     "won_by": {s: won.count(s) for s in sorted(set(won))}, "seconds_with_compile": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def compare_overlap(args, xs, ys) -> dict:
    """Compiled batched fits alternating (``--compare-overlap R`` rounds) with the host's work overlapping the
    device's (as shipped) and without: every dataset selected when refinement ends (the refinement run is told its
    chunks are never ready early) and, with the transformer in the pool, its decoding waited for before the host
    builds the other candidates. Seconds per fit and their medians."""
    import sr_jax.candidates as candidates
    import sr_jax.refinement as refinement
    from sr_jax import SymbolicTransformerRegressor

    start = candidates.start_model_candidates

    def start_and_wait(*a, **k):
        done = start(*a, **k)()
        return lambda: done

    def est():
        return SymbolicTransformerRegressor(candidate_sources=tuple(args.sources.split(",")), model_path=args.model,
                                            n_prior=args.n_prior, prior_draws=args.prior_draws, random_state=0)

    ready = refinement._Run.ready
    est().fit(xs, ys)  # compiles
    seconds: dict = {"overlapped": [], "serial": []}
    try:
        for r in range(args.compare_overlap):
            for mode in seconds:
                refinement._Run.ready = ready if mode == "overlapped" else (lambda run: True)
                candidates.start_model_candidates = start if mode == "overlapped" else start_and_wait
                t = time.perf_counter()
                est().fit(xs, ys)
                seconds[mode].append(round(time.perf_counter() - t, 2))
            print(json.dumps({"round": r + 1, **{k: v[-1] for k, v in seconds.items()}}), flush=True)
    finally:
        refinement._Run.ready, candidates.start_model_candidates = ready, start
    return {"seconds": seconds, "median_s": {k: float(np.median(v)) for k, v in seconds.items()},
            "speedup_median": float(np.median(np.array(seconds["serial"]) / np.array(seconds["overlapped"])))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=int, default=64)
    p.add_argument("--points", type=int, default=200)
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--sources", default="prior,bases")
    p.add_argument("--model", default=None, help="trained transformer (with 'model' in --sources)")
    p.add_argument("--n-prior", type=int, default=16, help="generator skeletons per dataset (with 'prior')")
    p.add_argument("--prior-draws", type=int, default=1024, help="prior library screened for them (with 'prior')")
    p.add_argument("--ablation", action="store_true", help="only the pool ablation (one batched fit per part)")
    p.add_argument("--skip-cold", action="store_true", help="skip the fresh-process measurements")
    p.add_argument("--cold-only", action="store_true", help="only the fresh-process measurements")
    p.add_argument("--phases", action="store_true", help="also report the seconds of pools / refinement / selection")
    p.add_argument("--rounds", type=int_at_least(1), default=1,
                   help="compiled rounds of (--datasets separate fits, one batched fit), alternating; the speed-up "
                        "per round "
                        "and its median are reported (this CPU's speed drifts within minutes)")
    p.add_argument("--compare-overlap", type=int_at_least(0), default=0, metavar="R",
                   help="only: R rounds of compiled batched fits with and without selection overlapping refinement")
    p.add_argument("--chunks", action="store_true",
                   help="also time the batched refinement chunk by chunk, and system time / page faults per mode")
    p.add_argument("--json")
    args = p.parse_args()
    sources = tuple(args.sources.split(","))
    from sr_jax import SymbolicTransformerRegressor

    xs, ys = datasets(args.datasets, args.dim, args.points)
    report = {"machine": machine_line(), "datasets": args.datasets, "points": args.points, "dim": args.dim,
              "sources": list(sources), "n_prior": args.n_prior, "prior_draws": args.prior_draws}
    if args.compare_overlap or args.ablation:
        if args.compare_overlap:
            report["compare_overlap"] = compare_overlap(args, xs, ys)
        else:
            report["ablation"] = ablation(args, xs, ys)
        emit(report, args.json)
        return
    if not args.skip_cold:
        report["fresh_process_no_cache"] = cold_start(args, sources, cache=False)
        report["fresh_process_warm_cache"] = cold_start(args, sources, cache=True)
        print(json.dumps(report), flush=True)
    if args.cold_only:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return

    def est():
        return SymbolicTransformerRegressor(candidate_sources=sources, model_path=args.model, n_prior=args.n_prior,
                                            prior_draws=args.prior_draws, random_state=0)

    from sr_jax.interpreter import COMPILE_COUNTER

    phases: dict = {}
    if args.phases:  # time the estimator's three stages (its own methods, wrapped in this process only)
        for stage in ("_pools", "_refine", "_select"):
            def timed(self, *a, _f=getattr(SymbolicTransformerRegressor, stage), _name=stage[1:], **k):
                t0 = time.perf_counter()
                try:
                    return _f(self, *a, **k)
                finally:
                    phases[_name] = phases.get(_name, 0.0) + time.perf_counter() - t0
            setattr(SymbolicTransformerRegressor, stage, timed)

    chunks: list = []
    if args.chunks:  # wrap the lockstep run's chunk step (this process only) to time each chunk after compilation
        import jax

        import sr_jax.refinement as refinement

        step, temp_mb = refinement._Run.step, {}

        def timed_step(run, stop_at, tol, hessian, until_running=0):
            if run.sig not in temp_mb:
                program = refinement._lockstep_program(run.sig, tol, run.dtype, hessian)
                compiled = program.lower(run.arrays, run.c, run.state, run.real, run.x, run.y, run.w,
                                         stop_at, until_running).compile()
                temp_mb[run.sig] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            t0 = time.perf_counter()
            step(run, stop_at, tol, hessian, until_running)
            jax.block_until_ready(run.c)
            seconds = time.perf_counter() - t0
            # the chunk ends at stop_at, or earlier ("reached") once at most until_running candidates still run
            st = jax.device_get(run.state)
            live = (st.n_evaluations < run.maxiter) & (st.grad_norm > tol)
            chunks.append({"rows": run.sig.n_expressions, "stop_at": stop_at,
                           "reached": int(st.n_evaluations[live].max()) if live.any() else stop_at,
                           "seconds": round(seconds, 3), "temp_MB": round(temp_mb[run.sig], 1)})
        refinement._Run.step = timed_step

    def usage():
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return np.array([r.ru_stime, r.ru_minflt], float)

    c0, t = COMPILE_COUNTER["refine"], time.perf_counter()
    for x, y in zip(xs, ys):  # first pass: compiles every shape the separate fits need
        est().fit(x, y)
    first_sep, programs_sep = time.perf_counter() - t, COMPILE_COUNTER["refine"] - c0
    c0, t = COMPILE_COUNTER["refine"], time.perf_counter()
    est().fit(xs, ys)  # first batched fit: compiles its shapes
    first_batch, programs_batch = time.perf_counter() - t, COMPILE_COUNTER["refine"] - c0
    rounds = []
    for r in range(args.rounds):  # compiled: separate fits then the batched fit, alternating
        times, r2_sep = [], []
        phases.clear()
        u0 = usage()
        for x, y in zip(xs, ys):
            t = time.perf_counter()
            e = est().fit(x, y)
            times.append(time.perf_counter() - t)
            r2_sep.append(e.score(x, y))
        if not r:
            phases_sep = {k: round(v, 2) for k, v in phases.items()}
            u_sep = usage() - u0
            phases.clear()
            chunks.clear()
        u0, t = usage(), time.perf_counter()
        batch = est().fit(xs, ys)
        t_batch = time.perf_counter() - t
        if not r:
            u_batch = usage() - u0
            phases_batch = {k: round(v, 2) for k, v in phases.items()}
            r2_batch, sep_times, batch_chunks = batch.score(xs, ys), times, list(chunks)
        rounds.append({"separate_s": round(float(np.sum(times)), 2), "batched_s": round(t_batch, 2),
                       "speedup": round(float(np.sum(times) / t_batch), 2)})
        print(json.dumps({"round": r + 1, **rounds[-1]}), flush=True)
    times = sep_times
    report.update({
        "fit_median_s": float(np.median(times)), "fit_max_s": float(np.max(times)),
        "separate_total_s": rounds[0]["separate_s"], "batched_total_s": rounds[0]["batched_s"],
        "batched_speedup": rounds[0]["speedup"], "rounds": rounds,
        "batched_speedup_median": float(np.median([r["speedup"] for r in rounds])),
        "first_pass_separate_s": first_sep, "first_pass_batched_s": first_batch,
        "first_pass_speedup": first_sep / first_batch,
        "refine_programs_traced_separate": programs_sep, "refine_programs_traced_batched": programs_batch,
        "r2_gt_0.99_separate": float(np.mean(np.asarray(r2_sep) > 0.99)),
        "r2_gt_0.99_batched": float(np.mean(np.asarray(r2_batch) > 0.99)),
    })
    if args.phases:
        report.update({"phases_separate_s": phases_sep, "phases_batched_s": phases_batch})
    if args.chunks:
        report.update({"batched_refine_chunks": batch_chunks,
                       "system_s_and_minor_faults_separate": [round(u_sep[0], 2), int(u_sep[1])],
                       "system_s_and_minor_faults_batched": [round(u_batch[0], 2), int(u_batch[1])]})
    emit(report, args.json)


def emit(report: dict, path) -> None:
    """Print the report and, with --json, write it there."""
    print(json.dumps(report, indent=2))
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
