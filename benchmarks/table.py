"""The readable table printed on stdout, and the goals of issue 4 checked against the figures."""

from __future__ import annotations

from typing import Any

# Goal → (threshold, unit); reported, never asserted. Issue 18 (one process per job):
# an empty job that finds a spare ready, a spare prepared (fork → ready), a batch of ten.
ISOLATION_GOAL_MS = 1.0  # issue 8: job isolation within a millisecond of none
REPLACEMENT_GOAL_MS = {"cpu": 40.0, "xla": 80.0}
BATCH_GOAL_RATIO = {"cpu": 250.0, "xla": 400.0}
HTTP_EMPTY_GOAL_MS = 8.0
LIBRARY_EMPTY_GOAL_MS = 3.0
HTTP_OWN_COST_GOAL_MS = 2.0  # issue 23: what the HTTP path adds to the library's empty job
HF_IMPORTS_GOAL_RATIO = 50.0  # issue 20: the Hugging Face imports warm ≥ 50× faster than cold


def http_own_cost_ms(backend: dict[str, Any]) -> float | None:
    """What the HTTP path adds to an empty job's p50 over the library's: from the two
    measured interleaved (service.own_cost), else from the dispatch figures (measured one
    after the other: an older results file)."""
    if "own_cost" in backend:
        return backend["own_cost"].get("own_cost_ms")
    http, library = (backend["dispatch"].get(k, {}).get("p50_ms") for k in ("http", "library"))
    return None if http is None or library is None else round(http - library, 2)


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per goal and backend: the figure, the target and met / missed."""
    rows = []

    def row(backend: str, goal: str, value: float | None, target: float,
            higher_is_better: bool = False) -> None:
        met = None if value is None else (value >= target if higher_is_better else value < target)
        rows.append({"backend": backend, "goal": goal, "value": value, "target": target, "met": met})

    for backend, s in results["backends"].items():
        batch_goal = BATCH_GOAL_RATIO.get(backend, 250.0)
        row(backend, f"batch of {s['batch']['size']}: cold ÷ warm ≥ {batch_goal:g}×",
            s["batch"].get("ratio"), batch_goal, higher_is_better=True)
        row(backend, f"empty job via HTTP p50 ≤ {HTTP_EMPTY_GOAL_MS:g} ms",
            s["dispatch"]["http"].get("p50_ms"), HTTP_EMPTY_GOAL_MS)
        row(backend, f"empty job via library p50 ≤ {LIBRARY_EMPTY_GOAL_MS:g} ms",
            s["dispatch"]["library"].get("p50_ms"), LIBRARY_EMPTY_GOAL_MS)
        row(backend, f"HTTP path's own cost (HTTP p50 − library p50, interleaved) "
            f"≤ {HTTP_OWN_COST_GOAL_MS:g} ms", http_own_cost_ms(s), HTTP_OWN_COST_GOAL_MS)
        target = REPLACEMENT_GOAL_MS.get(backend, 150.0)
        row(backend, f"spare prepared (fork → ready) p50 ≤ {target:g} ms",
            (s["replacement"].get("worker_fork_to_ready") or {}).get("p50_ms"), target)
        iso = s.get("isolation") or {}
        throughput = (s.get("throughput") or {}).get("library") or []
        if throughput:
            rows.append({"backend": backend, "goal": "back-to-back empty jobs (library, 1 client), jobs/s",
                         "value": throughput[0].get("jobs_per_s"), "target": None, "met": None})
        row(backend, f"isolation adds < {ISOLATION_GOAL_MS:g} ms to an empty job (p50)",
            iso.get("uid_minus_none_p50_ms"), ISOLATION_GOAL_MS)
        hf = s["latency"].get("hf_imports")
        if hf:
            row(backend, f"hf_imports: cold ÷ warm library ≥ {HF_IMPORTS_GOAL_RATIO:g}× (p50)",
                hf.get("ratio_cold_over_warm_library"), HF_IMPORTS_GOAL_RATIO, higher_is_better=True)
    soak = results.get("soak") or {}
    if soak:
        for key, what in (("health_worst_s", "soak: worst GET /health"),
                          ("timeout_overshoot_worst_s", "soak: worst timeout overshoot")):
            row("cpu", f"{what} ≤ {soak['goal_s']:g} s", soak.get(key), soak["goal_s"] + 1e-9)
    chaos = results.get("chaos") or {}
    if chaos:  # issue 21: no value (None) when the pool was never whole again: missed
        row("cpu", f"chaos: pool whole again ≤ {chaos['goal_s']:g} s after the last kill",
            chaos.get("recovery_s"), chaos["goal_s"] + 1e-9)
        if chaos.get("recovery_s") is None and chaos.get("kills"):
            rows[-1]["met"] = False
        rows.append({"backend": "cpu", "goal": "chaos: jobs without exactly one result",
                     "value": chaos.get("lost_count"), "target": 0, "met": chaos.get("lost_count") == 0})
    cc = results.get("cluster_chaos") or {}
    if cc and "skipped" not in cc:  # issue 21 item 4: the figure, and whether every check held
        rows.append({"backend": "cpu", "goal": "cluster chaos: jobs completed per minute under node churn",
                     "value": cc.get("jobs_per_minute"), "target": None, "met": None})
        rows.append({"backend": "cpu", "goal": "cluster chaos: failed checks (one result each, none stuck, "
                     "API < 1 s, no leftovers)", "value": len(cc.get("problems") or []), "target": 0,
                     "met": not cc.get("problems")})
    return rows


def _f(value: Any, nd: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{nd}f}"
    return str(value)


def _lat(stats: dict[str, Any]) -> str:
    return f"{_f(stats.get('min_ms'))} / {_f(stats.get('p50_ms'))} / {_f(stats.get('p95_ms'))}"


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render(results: dict[str, Any]) -> str:
    """Everything a reader needs from the run, as plain text."""
    m = results["machine"]
    out = [f"Trainium Executor benchmark ({results['mode']}) — {m['date_utc']}",
           f"{m['cpu_model']}, {m['logical_cores']} logical cores, {m.get('memory_gb', '?')} GB; "
           f"python {m['python']}, torch {m['torch_version']}, torch-xla {m['torch-xla_version']}",
           f"pool size 2; cold = fresh `python main.py` per script; run took {results.get('duration_s')} s; "
           f"load avg {m.get('load_avg_start')} → {m.get('load_avg_end')}"]
    for backend, s in results["backends"].items():
        out += ["", f"== backend {backend} (pool ready in {_f(s.get('pool_start_s'), 2)} s library, "
                    f"{_f(s.get('service_start_s'), 2)} s service) =="]
        rows = [[name, _lat(r["cold"]), _lat(r["warm_http"]), _lat(r["warm_library"]),
                 f"{_f(r['ratio_cold_over_warm_http'])}×"] for name, r in s["latency"].items()]
        out += _grid(["workload (ms)", "cold min/p50/p95", "warm HTTP min/p50/p95",
                      "warm library min/p50/p95", "cold÷warm HTTP p50"], rows)
        recycled = {n: r["warm_library"].get("respawns_during") for n, r in s["latency"].items()
                    if r["warm_library"].get("respawns_during")}
        if recycled:
            out.append(f"workers replaced during warm library runs: {recycled}")
        iso = s.get("isolation") or {}
        if iso:
            parts = [f"{k} p50 {_f(v.get('p50_ms'), 2)} ms" + (
                     f" (after-job restore and fingerprint check {_f(v.get('check_ms_mean'), 2)} ms, off "
                     "the result's path)" if v.get("check_ms_mean") else "")
                     for k, v in iso.items() if isinstance(v, dict) and "p50_ms" in v]
            out.append("empty job via library, isolation " + "; ".join(parts))
        b = s["batch"]
        out.append(f"batch of {b['size']}: cold {_f(b.get('cold_s'), 2)} s sequential, warm POST "
                   f"/execute_batch {_f(b.get('warm_http_s'), 3)} s → {_f(b.get('ratio'))}× "
                   f"({(b.get('response') or {}).get('successful')} ok; scripts ran "
                   f"{_f((b.get('response') or {}).get('sum_execution_s'), 3)} s in total)")
        d = s["dispatch"]
        out.append(f"empty job p50/p95: library {_f(d['library'].get('p50_ms'), 2)}/"
                   f"{_f(d['library'].get('p95_ms'), 2)} ms (worker side "
                   f"{_f(d['library']['execution'].get('p50_ms'), 2)} ms), HTTP "
                   f"{_f(d['http'].get('p50_ms'), 2)}/{_f(d['http'].get('p95_ms'), 2)} ms")
        r = s["replacement"]
        out.append(f"replacement after SIGKILL p50/p95: {_f(r.get('p50_ms'))}/{_f(r.get('p95_ms'))} ms "
                   f"(fork→ready in the worker p50 {_f(r['worker_fork_to_ready'].get('p50_ms'))} ms, "
                   f"n={r.get('n')})")
        t = s["timeout"]
        parts = [f"{k} p50 {_f(v.get('p50_ms'))} ms (n={v.get('n')})" for k, v in t.items()]
        out.append("timeout: deadline → caller has the result: " + "; ".join(parts)
                   + f"; kill_grace={t['sigint'].get('kill_grace')}")
        out += _memory_lines(s["memory"])
        out += _throughput_lines(s["throughput"])
    c = results.get("cluster")
    if c:
        out += ["", "== several instances: Ray, on this machine (benchmarks/cluster.py) =="]
        out += _cluster_lines(c) if "batch" in c else [f"skipped: {c.get('skipped')}"]
    cc = results.get("cluster_chaos")
    if cc:
        out += ["", "== cluster chaos: mixed jobs while nodes are SIGKILLed and restarted "
                    "(benchmarks/cluster_chaos.py) =="]
        out += [f"skipped: {cc['skipped']}"] if "skipped" in cc else [
            f"{_f(cc.get('jobs_per_minute'))} jobs completed per minute over {cc['seconds']:g} s with "
            f"{cc.get('kills')} node kills; {cc.get('jobs_submitted')} jobs, {cc.get('results')} results, "
            f"{cc.get('run_again')} run again, {cc.get('node_lost')} node_lost; slowest API answer "
            f"{_f(cc.get('slowest_answer_s'), 3)} s; problems: {cc.get('problems') or 'none'}"]
    soak = results.get("soak")
    if soak:
        out += ["", f"== soak: hostile jobs for {soak['seconds']:g} s (benchmarks/soak.py) ==",
                f"worst GET /health {_f(soak.get('health_worst_s'), 3)} s over {soak.get('health_requests')} "
                f"requests; worst timeout overshoot {_f(soak.get('timeout_overshoot_worst_s'), 3)} s over "
                f"{soak.get('control_jobs')} control jobs; hostile jobs ended: {soak.get('hostile')}"]
    chaos = results.get("chaos")
    if chaos:
        out += ["", f"== chaos: mixed jobs for {chaos['seconds']:g} s, SIGKILLs from outside "
                    "(benchmarks/chaos.py) ==",
                f"{chaos.get('jobs_submitted')} jobs submitted, {chaos.get('results')} results "
                f"({chaos.get('lost_count')} lost); {chaos.get('kills')} kills "
                f"{chaos.get('kills_by_target')}; "
                f"pool whole again {_f(chaos.get('recovery_s'), 2)} s after the last kill; "
                f"refused {chaos.get('refused') or 'none'}; leftovers {len(chaos.get('leftovers') or [])}"]
    if results.get("errors"):
        out += ["", "ERRORS:"] + [f"  {k}: {v}" for k, v in results["errors"].items()]
    out += ["", "== goals (reported, not asserted) =="]
    out += _grid(["backend", "goal", "value", "met"],
                 [[g["backend"], g["goal"], _f(g["value"], 2),
                   {True: "met", False: "MISSED", None: "-"}[g["met"]]] for g in results["goals"]])
    return "\n".join(out)


def _memory_lines(mem: dict[str, Any]) -> list[str]:
    before = mem["before"]
    lines = [f"memory (MiB): template RSS {_f(before.get('template_rss_mb'))}"]
    for pid, w in before["workers"].items():
        if "error" in w:
            lines.append(f"  worker {pid}: {w['error']}")
            continue
        g = mem["growth"].get(pid)
        grow = (f"after {mem['jobs']} jobs USS {g['uss_mb']:+.1f}, PSS {g['pss_mb']:+.1f}"
                if isinstance(g, dict) else f"after {mem['jobs']} jobs: {g or 'recycled'}")
        lines.append(f"  idle worker {pid}: RSS {_f(w['rss_mb'])}, USS {_f(w['uss_mb'])}, "
                     f"PSS {_f(w['pss_mb'])} (shared {_f(w['shared_mb'])}); {grow}")
    return lines


def _throughput_lines(tp: dict[str, Any]) -> list[str]:
    parts = []
    for where in ("library", "http"):
        for row in tp.get(where, []):
            err = " (errors)" if row.get("errors") else ""
            parts.append(f"{where} {row['clients']} clients {_f(row['jobs_per_s'])}/s{err}")
    return ["empty-job throughput: " + ", ".join(parts)]


def _cluster_lines(c: dict[str, Any]) -> list[str]:
    b, d = c["batch"], c["dispatch"]

    def pair(stats: dict[str, Any]) -> str:
        return f"{_f(stats.get('p50_ms'), 2)}/{_f(stats.get('p95_ms'), 2)}"

    return [f"batch of {c['batch_size']} jobs of {c['job_s']:g} s, {c['nodes_workers']} workers a node: "
            f"1 node {_f(b['one_node_s'], 2)} s, 2 nodes {_f(b['two_nodes_s'], 2)} s → scaling "
            f"{_f(b['scaling'], 2)}× (the jobs wait: the nodes share this machine's cores)",
            f"empty job p50/p95 (ms): library local {pair(d['local_library'])}, through Ray "
            f"{pair(d['cluster_library'])} (+{_f(d['overhead_library_p50_ms'], 2)} p50); HTTP local "
            f"{pair(d['local_http'])}, through Ray {pair(d['cluster_http'])} "
            f"(+{_f(d['overhead_http_p50_ms'], 2)} p50)"]
