"""Collect what ``benchmarks/gpu_ab.sh`` measured into one JSON and print the A/B table.

    python benchmarks/gpu_ab_report.py WORK_DIR OUT_JSON

WORK_DIR holds ``runs.tsv`` (one line per command: name, exit status, start and end time in s since the epoch),
``eff_*/efficiency.json`` (inference variants, each compared with the first variant of its process) and
``train/<variant>/benchmark.json`` (training-step variants). Speed-ups are against the baseline of the same
workload, batch and process; training numerics are the largest relative gap of any logged loss against the
baseline at the same stage and batch (same seed, weights and synthetic batch, after the same number of steps).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def runs(work: Path) -> List[Dict[str, object]]:
    """Each command's exit status, wall time and exit lag (seconds from its last written file to its exit)."""
    out = []
    tsv = work / "runs.tsv"
    for line in (tsv.read_text().splitlines() if tsv.exists() else []):
        name, rc, start, end = line.split("\t")[:4]
        files = [f for f in (work / name).rglob("*") if f.is_file()] if (work / name).is_dir() else []
        last = max((f.stat().st_mtime for f in files), default=None)
        out.append({"name": name, "rc": int(rc) if rc.lstrip("-").isdigit() else rc, "wall_s": float(end) - float(start),
                    "exit_lag_s": float(end) - last if last else None})
    return out


def inference_rows(work: Path) -> List[Dict[str, object]]:
    rows = []
    for path in sorted(work.glob("eff_*/efficiency.json"), key=lambda p: (p.parent.name != "eff_variants", p.parent.name)):
        records = (_read(path) or {}).get("records", [])
        base = {}
        for r in records:
            key = (r["task"], r["dtype"], r["batch"], r["img_size"])
            base.setdefault(key, r)  # the process's first variant is its baseline
            b = base[key]
            ok = "error" not in r and "error" not in b
            rows.append({
                "workload": r["task"], "run": path.parent.name, "variant": r.get("variant", "run"), "batch": r["batch"],
                "img_size": r["img_size"], "images_per_s": r.get("images_per_s"), "peak_gb": r.get("peak_memory_gb"),
                "warmup_s": r.get("warmup_s"), "error": r.get("error"),
                "speedup": r["images_per_s"] / b["images_per_s"] if ok else None,
                "numerics": (f"ids {r['ids_agree_pct']:.2f} %" if "ids_agree_pct" in r else
                             f"max|d| {r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""),
            })
    return rows


def training_rows(work: Path) -> List[Dict[str, object]]:
    cells = []
    for path in sorted((work / "train").glob("*/benchmark.json")):
        for c in (_read(path) or {}).get("train_step", []):
            cells.append({**c, "variant": path.parent.name})
    for path in sorted((work / "train").glob("*/variant.json")):
        v = _read(path) or {}
        if v.get("error"):
            cells.append({"variant": v["variant"], "stage": None, "batch": None, "error": v["error"][:120]})
    base: Dict[tuple, dict] = {}
    for c in cells:  # the first error-free baseline cell of each (stage, batch)
        if c["variant"].startswith("baseline") and "error" not in c:
            base.setdefault((c["stage"], c["batch"]), c)
    rows = []
    for c in cells:
        b = base.get((c.get("stage"), c.get("batch")))
        ok = "error" not in c and b is not None
        gap = None
        if ok:
            gaps = [abs(c["last_losses"][k] - v) / max(abs(v), 1e-8) for k, v in b["last_losses"].items()
                    if k.startswith("loss") and k in c["last_losses"]]
            gap = max(gaps) if gaps else None
        rows.append({
            "workload": f"train stage {c.get('stage')}", "run": "train", "variant": c["variant"], "batch": c.get("batch"),
            "img_size": c.get("img_size"), "images_per_s": c.get("images_per_s"), "peak_gb": c.get("peak_memory_gb"),
            "error": c.get("error"), "speedup": c["images_per_s"] / b["images_per_s"] if ok else None,
            "numerics": f"loss gap {gap:.1%}" if gap is not None else "",
        })
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    lines = ["| workload | variant | batch | images/s | peak GB | speed-up | numerics vs baseline | run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ips = r["error"] or (f"{r['images_per_s']:.1f}" if r["images_per_s"] is not None else "–")
        gb = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "–"
        up = f"{r['speedup']:.2f}×" if r.get("speedup") is not None else "–"
        lines.append(f"| {r['workload']} | {r['variant']} | {r['batch']} | {ips} | {gb} | {up} | {r['numerics']} | {r['run']} |")
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    work, out_json = Path(argv[0]), Path(argv[1])
    rows = inference_rows(work) + training_rows(work)
    commands = runs(work)
    skipped = (work / "skipped.txt").read_text().split() if (work / "skipped.txt").exists() else []
    env = _read(work / "environment.json") or {}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"environment": env, "commands": commands, "skipped": skipped, "rows": rows},
                                   indent=2))
    print("\nCommands (rc, wall s, exit lag s = last file written → process exit):")
    for c in commands:
        lag = f"{c['exit_lag_s']:.1f}" if c["exit_lag_s"] is not None else "–"
        print(f"  {c['name']}: rc {c['rc']}, {c['wall_s']:.0f} s, exit lag {lag}")
    if skipped:
        print(f"  skipped for the time budget: {' '.join(skipped)}")
    print(f"\nwrote {out_json}\n")
    print(table(rows))  # last: the table is what the caller reads
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
