#!/usr/bin/env python3
"""Validation of `kvtier plan` against `kvtier bench e2e` (issue 7).

Two steps, so that the GPU host only spends its time on measurements:

  run      on the GPU host: one `kvtier bench e2e` main run (speed figures
           only, KVTIER_E2E_FIDELITY=0) per configuration, each JSON kept.
  compare  anywhere: `kvtier plan` with a machine profile that `kvtier
           calibrate` measured on that host, at each run's budgets, given the
           selection overlap the run measured and the plan's default; prints
           one JSON object with predicted vs measured decode steps/s and
           prefill seconds and the error of each. Decode is also predicted
           from the run's own selection shares (--selection-shares), which
           separates the timing model's error from the selection model's.

A configuration is CONTEXT:GPU:HOST:CACHE, e.g. 128K:8GiB:6GiB:1GiB: context
tokens, GPU budget, host budget per session and the part of it that stages
NVMe reads. Host homes are HOST - CACHE; the rest of the KV is on NVMe.
"""
import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_POINTS = [
    "128K:8GiB:6GiB:1GiB",     # NVMe used: 16 GiB of KV over 8 GiB GPU, 5 GiB host homes
    "128K:24GiB:20GiB:2GiB",   # no NVMe: host homes hold the whole KV
    "512K:8GiB:72GiB:4GiB",    # no NVMe, a small GPU tier
    "512K:24GiB:48GiB:4GiB",   # NVMe used: 64 GiB of KV, 44 GiB host homes
    "512K:40GiB:72GiB:4GiB",   # no NVMe, a large GPU tier
]


def label(point):
    return point.replace(":", "_")


def parse_point(point):
    parts = point.split(":")
    if len(parts) != 4:
        sys.exit(f"validate_plan: '{point}' is not CONTEXT:GPU:HOST:CACHE (e.g. 128K:8GiB:6GiB:1GiB)")
    return dict(zip(("context", "gpu", "host", "cache"), parts))


def run(args):
    os.makedirs(args.out, exist_ok=True)
    for point in args.points:
        p = parse_point(point)
        env = dict(os.environ, KVTIER_E2E_RUNS="main", KVTIER_E2E_FIDELITY="0", KVTIER_E2E_CONTEXT=p["context"],
                   KVTIER_E2E_GPU_BYTES=p["gpu"], KVTIER_E2E_HOST_BYTES=p["host"],
                   KVTIER_E2E_HOST_CACHE_BYTES=p["cache"])
        if args.summary:
            env["KVTIER_E2E_SUMMARY"] = args.summary
        out = os.path.join(args.out, f"e2e_{label(point)}.json")
        t0 = time.time()
        with open(out, "w") as f, open(out + ".err", "w") as err:
            rc = subprocess.call([args.kvtier, "bench", "e2e", "--json", "--dir", args.dir], env=env, stdout=f,
                                 stderr=err)
        print(f"validate_plan: {point}: exit {rc} in {time.time() - t0:.0f} s -> {out}", flush=True)


def results_of(report):
    return {r["name"]: r["value"] for r in report["results"]}


def bytes_of(text):
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    for u, m in units.items():
        if text.endswith(u):
            return int(float(text[: -len(u)]) * m)
    return int(text)


def plan(args, point, overlap, summary, late=None, shares=None):
    p = parse_point(point)
    host = bytes_of(p["host"])
    # The run's staging cache: the given size, or the runtime's default of a quarter of host bytes.
    cache = bytes_of(p["cache"]) or host // 4
    cmd = [args.kvtier, "plan", "--model", args.model, "--context", p["context"], "--machine", args.profile,
           "--gpu-budget", p["gpu"], "--host-budget", str(host - cache), "--host-cache", str(cache), "--json"]
    if summary:
        cmd += ["--policy", f"summary={summary}"]
    if overlap is not None:
        cmd += ["--selection-overlap", f"{overlap:.4f}"]
    if late is not None:
        cmd += ["--late", late]
    if shares is not None:
        g = round(shares[0], 4)
        n = min(round(shares[1], 4), round(1 - g, 4))  # rounded, the two must not pass 1
        cmd += ["--selection-shares", f"gpu={g:.4f},nvme={n:.4f}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"validate_plan: {' '.join(cmd)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout), " ".join(cmd)


def error(predicted, measured):
    return (predicted - measured) / measured


def compare(args):
    rows, worst = [], {}
    for point in args.points:
        path = os.path.join(args.e2e_dir, f"e2e_{label(point)}.json")
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            rows.append({"configuration": point, "error": f"no measurement: {path}: {e}"})
            continue
        r = results_of(report)
        cfg = report["config"]
        summary = cfg["policy"].split("summary=")[1].split()[0]
        main = cfg["runs"]["main"]
        row = {"configuration": point, "placement_bytes": main["placement_bytes_sequence0"],
               "nvme_used": main["placement_bytes_sequence0"]["nvme_home"] > 0}
        # The late=summary phase (rho 0.9, run after the two others) reports no
        # overlap of its own: the main phase's, same query correlation, is used.
        # The two late=wait phases are also predicted from the run's own
        # selection shares (GPU-resident and NVMe-read blocks per layer step
        # over the selected ones): what is left is the timing model's error,
        # apart from the selection model's.
        for phase, steps_key, overlap_key, late, stats_key in (
                ("rho 0.9", "decode_steps_per_s", "selection_overlap", None, "stats"),
                ("rho 0", "decode_steps_per_s_uncorrelated", "selection_overlap_uncorrelated", None, "stats_second"),
                ("rho 0.9, late=summary", "decode_steps_per_s_late_summary", "selection_overlap", "summary", None)):
            if steps_key not in r or r[steps_key] is None or r.get(overlap_key) is None:
                continue
            measured = r[steps_key]
            pj, cmd = plan(args, point, r[overlap_key], summary, late)
            predicted = pj["decode_tokens_per_s"]["attention_tiering"]  # batch 1: steps/s
            row[f"decode {phase}"] = {"measured_overlap": r[overlap_key], "predicted_steps_per_s": predicted,
                                      "measured_steps_per_s": measured,
                                      "error": error(predicted, measured) if predicted else None, "plan": cmd}
            blocks = main.get(stats_key, {}).get("blocks_per_layer_step", {}) if stats_key else {}
            if not blocks.get("selected"):
                continue
            shares = (blocks["gpu_resident"] / blocks["selected"], blocks["nvme_read"] / blocks["selected"])
            pj, cmd = plan(args, point, r[overlap_key], summary, late, shares)
            predicted = pj["decode_tokens_per_s"]["attention_tiering"]
            row[f"decode {phase}, measured selection"] = {
                "measured_gpu_share": shares[0], "measured_nvme_share": shares[1],
                "predicted_steps_per_s": predicted, "measured_steps_per_s": measured,
                "error": error(predicted, measured) if predicted else None, "plan": cmd}
        if "decode_steps_per_s" in r:
            pj, cmd = plan(args, point, None, summary)
            predicted = pj["decode_tokens_per_s"]["attention_tiering"]
            row["decode rho 0.9, plan's default overlap"] = {
                "predicted_steps_per_s": predicted, "measured_steps_per_s": r["decode_steps_per_s"],
                "error": error(predicted, r["decode_steps_per_s"]) if predicted else None, "plan": cmd}
            measured_s = main["prefill_s"]
            predicted_s = pj["prefill_seconds_attention"]
            row["prefill attention-only"] = {"predicted_s": predicted_s, "measured_s": measured_s,
                                             "error": error(predicted_s, measured_s) if predicted_s else None}
            # By part: the model's prefill_parts_seconds against the executor's
            # per-block timers summed over the run's layer blocks (seconds).
            stats = main.get("prefill_stats", {})
            per_block = stats.get("ms_per_layer_block", {})
            if "prefill_parts_seconds" in pj and per_block:
                blocks = stats.get("layer_blocks", 0)
                measured = {part: per_block[timer] * blocks / 1e3
                            for part, timer in (("stage", "stage"), ("query", "score"), ("fetch", "pin"),
                                                ("attention", "attention_and_rest"),
                                                ("home_write_exposed", "home_write_wait"))}
                # Waits for a home write inside the pin step (early joins; runs
                # before they had their own timer counted them in both) belong
                # to the exposed home writes, not to the fetch.
                early = stats.get("home_write_early_wait_ms_per_layer_block", 0.0) * blocks / 1e3
                measured["fetch"] -= early
                measured["home_write_exposed"] += early
                row["prefill parts (predicted_s, measured_s)"] = {
                    part: [pj["prefill_parts_seconds"][part], value] for part, value in measured.items()}
        for k, v in row.items():
            if isinstance(v, dict) and v.get("error") is not None:
                kind = "prefill" if k.startswith("prefill") else k
                if kind not in worst or abs(v["error"]) > abs(worst[kind]["error"]):
                    worst[kind] = {"configuration": point, "error": v["error"]}
        rows.append(row)
    json.dump({"rows": rows, "worst": worst}, sys.stdout, indent=1)
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    r = sub.add_parser("run")
    r.add_argument("--kvtier", default="build-gpu/bin/kvtier")
    r.add_argument("--dir", required=True, help="NVMe directory for the runs")
    r.add_argument("--out", required=True, help="where the e2e JSON files go")
    r.add_argument("--summary", help="KVTIER_E2E_SUMMARY for every run")
    r.add_argument("points", nargs="*", default=DEFAULT_POINTS)
    c = sub.add_parser("compare")
    c.add_argument("--kvtier", default="build/bin/kvtier")
    c.add_argument("--profile", required=True, help="machine profile JSON from kvtier calibrate on the GPU host")
    c.add_argument("--e2e-dir", required=True)
    c.add_argument("--model", default="llama-3.1-8b",
                   help="the runs' shape: a preset or a config.json (the build machine's quick shape needs one)")
    c.add_argument("points", nargs="*", default=DEFAULT_POINTS)
    a = ap.parse_args()
    run(a) if a.step == "run" else compare(a)


if __name__ == "__main__":
    main()
