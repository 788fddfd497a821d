"""Evaluate a joint image–report diffusion model: text→image, image→report and joint samples.

    python -m evaluation.diffusion --checkpoint runs/diffusion_tiny \\
        --cache runs/diffusion_tiny/tokens/examples_train --out runs/diffusion_tiny/eval --random-inception

For each of the first ``--num-samples`` rows of a token cache (images as MedITok ids + captions):

* text→image from the row's caption: gFID and diversity (1 − MS-SSIM) per modality, from
  ``evaluation.generation_metrics`` (shared with the AR generator); the reference images are the
  MedITok decodings of the cache's real ids (the tokenizer's ceiling, the same decoder as the samples);
* image→report from the row's image ids: BLEU-1..4, ROUGE-L, METEOR against the row's caption;
* joint (image and report from the row's label only): the same report metrics and image metrics;
* agreement (``--align-checkpoint``): cosine between a stage-2 MedITok's image alignment embedding and
  f_text(BiomedCLIP text embedding) for real pairs, shuffled real pairs (chance level) and each task's
  generated pairs.

Writes ``diffusion_eval.{json,md,csv}`` (+ ``diffusion_eval_reports.csv`` with every generated report and
sample grids) and prints sampling speed (images/s, text tokens/s).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from evaluation.report import environment, markdown_table, relative, write_outputs
from evaluation.report_metrics import AgreementJudge, load_text_head, report_metrics
from generation.diffusion.loading import load_for_inference
from generation.diffusion.sampler import METHODS, SAMPLE_TASKS, SamplerOptions, sample
from training.options import FAILURES, failure_status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.diffusion", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="diffusion checkpoint file, or a run folder (--out of the trainer: its newest checkpoint, "
                        "ckpt-*.pth, or checkpoints/latest.pt of older runs)")
    p.add_argument("--cache", required=True, help="token cache to evaluate on (captions + real ids), made with "
                                                  "the same MedITok as the training cache")
    p.add_argument("--meditok", default=None, help="MedITok to decode ids (default: the cache's tokenizer source)")
    p.add_argument("--out", default="runs/diffusion_eval", help="output folder")
    p.add_argument("--tasks", nargs="+", default=list(SAMPLE_TASKS), choices=SAMPLE_TASKS)
    p.add_argument("--num-samples", type=int, default=64, help="rows of the cache to use (all if fewer)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=16, help="unmasking steps")
    p.add_argument("--method", default="confidence", choices=METHODS)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception", default=None, help="pytorch-fid Inception weights file (see external/README.md)")
    p.add_argument("--random-inception", action="store_true",
                   help="random Inception weights: a smoke test of the pipeline, the FID values mean nothing")
    p.add_argument("--no-image-metrics", action="store_true", help="skip gFID/diversity")
    p.add_argument("--align-checkpoint", default=None,
                   help="stage-2 MedITok training checkpoint (with the f_text head), or its run folder, for image–report "
                        "agreement")
    p.add_argument("--biomedclip", default=None, help="BiomedCLIP folder for agreement ('tiny' for the test stand-in)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def open_eval_cache(path: str, label_names: Sequence[str], expected_fingerprint: Optional[str], checkpoint: str):
    from generation.token_cache import TokenCache

    cache = TokenCache(path, label_names=list(label_names))
    if expected_fingerprint and cache.fingerprint != expected_fingerprint:
        raise ValueError(f"{path} holds ids of another MedITok (fingerprint {cache.fingerprint[:16]}) than the one "
                         f"{checkpoint} was trained on ({expected_fingerprint[:16]}); tokenize the evaluation images "
                         f"with the training cache's tokenizer")
    return cache


def decode(decoder, ids: torch.Tensor, grid) -> torch.Tensor:
    with torch.no_grad():
        return decoder.idx_to_img(ids.to(decoder.device), grid).cpu()


def run_sampling(model, codec, cache, rows: List[int], args, decoder) -> Dict[str, Any]:
    """Sample every task over ``rows`` in batches; returns ids, decoded images, reports and timings."""
    device = next(model.parameters()).device
    options = SamplerOptions(steps=args.steps, method=args.method, temperature=args.temperature,
                             cfg_scale=args.cfg_scale, schedule="loglinear")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    grid = model.config.grid
    out: Dict[str, Any] = {"real_images": [], "captions": [], "labels": []}
    timing = {task: 0.0 for task in args.tasks}
    for task in args.tasks:
        out[task] = {"images": [], "reports": []}
    for start in tqdm(range(0, len(rows), args.batch_size), desc="sampling", dynamic_ncols=True):
        items = [cache[i] for i in rows[start:start + args.batch_size]]
        captions = [it["caption"] for it in items]
        real = torch.stack([it["ids"] for it in items]).to(device)
        labels = torch.tensor([int(it["label"]) for it in items], device=device)
        out["captions"] += captions
        out["labels"] += labels.tolist()
        out["real_images"].append(decode(decoder, real, grid) if decoder is not None else None)
        text = codec.encode(captions, source="evaluation captions").to(device)
        for task in args.tasks:
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            gen_text, gen_image = sample(model, task=task, labels=labels, text_ids=text, image_ids=real,
                                         options=options, generator=generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timing[task] += time.perf_counter() - began
            if task in ("text_to_image", "joint"):
                out[task]["images"].append(decode(decoder, gen_image, grid) if decoder is not None else None)
            if task in ("image_to_text", "joint"):
                out[task]["reports"] += codec.decode(gen_text)
    n = len(rows)
    out["speed"] = {task: {"seconds": timing[task], "images_per_s": n / timing[task] if task != "image_to_text" else None,
                           "text_tokens_per_s": n * model.config.text_len / timing[task] if task != "text_to_image" else None}
                    for task in args.tasks}
    return out


def image_metrics(fake: torch.Tensor, real: torch.Tensor, labels: List[int], names: Sequence[str], args,
                  network=None) -> Dict[str, Any]:
    """gFID and diversity per modality with ``evaluation.generation_metrics`` (shared with the AR generator).

    fake, real: [N, 3, H, W] in [-1, 1], row i of both has label ``labels[i]``."""
    from evaluation import generation_metrics
    from evaluation.fid_inception import DEFAULT_INCEPTION_WEIGHTS, build_fid_inception
    from evaluation.metrics import quantize_to_unit

    if network is None:
        network = build_fid_inception(args.inception or DEFAULT_INCEPTION_WEIGHTS,
                                      random_weights=args.random_inception, device=args.device)
    label_tensor = torch.tensor(labels)
    groups_fake, groups_real = {}, {}
    for index, name in enumerate(names):
        chosen = label_tensor == index
        if chosen.any():
            groups_fake[name] = quantize_to_unit(fake[chosen]).to(args.device)
            groups_real[name] = quantize_to_unit(real[chosen]).to(args.device)
    fid = generation_metrics.gfid_per_modality(network, groups_fake, groups_real)
    diversity = generation_metrics.diversity_over_modalities(
        {name: images.cpu() for name, images in groups_fake.items() if len(images) >= 2})
    return {"gfid_mean": fid["mean"], "gfid_std": fid["std"], "gfid_per_modality": fid["per_modality"],
            "diversity_mean": diversity["mean"], "diversity_per_modality": diversity["per_modality"],
            "images_per_modality": {name: len(images) for name, images in groups_fake.items()}}


def agreement(args, decoder_source: str, results: Dict[str, Any]) -> Dict[str, Any]:
    import local_openclip
    from meditok import load_meditok

    head = load_text_head(args.align_checkpoint)
    judge = AgreementJudge(load_meditok(args.align_checkpoint).eval(), local_openclip.load_text_teacher(args.biomedclip),
                           head)
    real = torch.cat(results["real_images"])
    captions = results["captions"]
    shuffled = captions[1:] + captions[:1]
    scores = {"real_pairs": judge.scores(real, captions).mean().item(),
              "shuffled_real_pairs": judge.scores(real, shuffled).mean().item()}
    if "text_to_image" in results:
        scores["text_to_image"] = judge.scores(torch.cat(results["text_to_image"]["images"]), captions).mean().item()
    if "image_to_text" in results:
        scores["image_to_text"] = judge.scores(real, results["image_to_text"]["reports"]).mean().item()
    if "joint" in results:
        scores["joint"] = judge.scores(torch.cat(results["joint"]["images"]), results["joint"]["reports"]).mean().item()
    return scores


def write_grids(out_dir: Path, results: Dict[str, Any], limit: int = 16) -> List[str]:
    from torchvision.utils import save_image

    written = []
    sets = {"real": results["real_images"]}
    for task in ("text_to_image", "joint"):
        if task in results:
            sets[task] = results[task]["images"]
    for name, chunks in sets.items():
        if not chunks or chunks[0] is None:
            continue
        images = torch.cat(chunks)[:limit]
        path = out_dir / f"samples_{name}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        save_image((images + 1) / 2, path, nrow=min(8, len(images)))
        written.append(relative(path))
    return written


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, codec, payload = load_for_inference(args.checkpoint, device)
    names = model.config.condition_names
    cache = open_eval_cache(args.cache, names, payload.get("tokenizer_fingerprint"), payload["_path"])
    if tuple(cache.grid) != tuple(model.config.grid):
        raise ValueError(f"{args.cache} has a {tuple(cache.grid)} token grid, the model {tuple(model.config.grid)}; "
                         f"tokenize the evaluation images at the training image size")
    decoder_source = args.meditok or cache.manifest.get("tokenizer_source")
    decoder = None
    if decoder_source and Path(str(decoder_source)).exists():
        from meditok import load_meditok
        decoder = load_meditok(decoder_source, img_size=cache.img_size).to(device).eval()
    elif not args.no_image_metrics or args.align_checkpoint:
        raise ValueError(f"no MedITok to decode images ({decoder_source!r}); pass --meditok or --no-image-metrics")
    rows = list(range(min(args.num_samples, len(cache))))
    results = run_sampling(model, codec, cache, rows, args, decoder)
    summary: Dict[str, Any] = {"speed": results["speed"], "tasks": {}}
    network = None
    if not args.no_image_metrics and {"text_to_image", "joint"} & set(args.tasks):
        from evaluation.fid_inception import DEFAULT_INCEPTION_WEIGHTS, build_fid_inception
        network = build_fid_inception(args.inception or DEFAULT_INCEPTION_WEIGHTS,
                                      random_weights=args.random_inception, device=args.device)
    for task in args.tasks:
        entry: Dict[str, Any] = {}
        if task in ("image_to_text", "joint"):
            entry["report"] = report_metrics(results["captions"], results[task]["reports"])
        if task in ("text_to_image", "joint") and not args.no_image_metrics:
            entry["image"] = image_metrics(torch.cat(results[task]["images"]), torch.cat(results["real_images"]),
                                           results["labels"], names, args, network)
        summary["tasks"][task] = entry
    if args.align_checkpoint:
        summary["agreement"] = agreement(args, decoder_source, results)
    out_dir = Path(args.out)
    summary["grids"] = write_grids(out_dir, results) if decoder is not None else []
    report_rows = [{"row": r, "label": names[results["labels"][i]], "caption": results["captions"][i],
                    **{f"{task}_report": results[task]["reports"][i] for task in ("image_to_text", "joint")
                       if task in results}} for i, r in enumerate(rows)]
    # "checkpoint": the file read (a run folder's newest checkpoint when --checkpoint names the folder)
    payload_out = {"checkpoint": relative(Path(payload["_path"])), "cache": relative(Path(args.cache)),
                   "num_samples": len(rows), "sampler": {"steps": args.steps, "method": args.method,
                                                          "temperature": args.temperature, "cfg_scale": args.cfg_scale},
                   "random_inception": args.random_inception, **summary, "environment": environment(device)}
    table = summary_rows(summary)
    markdown = render_markdown(payload_out, table)
    write_outputs(out_dir, "diffusion_eval", payload_out, markdown, {"": table, "reports": report_rows})
    for task, speed in results["speed"].items():
        parts = [f"{speed['images_per_s']:.2f} images/s" if speed["images_per_s"] else "",
                 f"{speed['text_tokens_per_s']:.0f} text tokens/s" if speed["text_tokens_per_s"] else ""]
        print(f"[diffusion eval] {task}: {', '.join(p for p in parts if p)} ({args.steps} steps, {len(rows)} samples)")
    print(f"[diffusion eval] wrote {relative(out_dir / 'diffusion_eval.md')}")
    return payload_out


def summary_rows(summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for task, entry in summary["tasks"].items():
        row: Dict[str, Any] = {"task": task}
        for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "meteor"):
            if "report" in entry:
                row[key] = entry["report"][key]
        if "image" in entry:
            row["gfid"] = entry["image"].get("gfid_mean")
            row["diversity"] = entry["image"].get("diversity_mean")
        if "agreement" in summary and task in summary["agreement"]:
            row["agreement"] = summary["agreement"][task]
        speed = summary["speed"].get(task, {})
        row["images_per_s"] = speed.get("images_per_s")
        row["text_tokens_per_s"] = speed.get("text_tokens_per_s")
        rows.append(row)
    return rows


def render_markdown(payload: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    header = ["task", "BLEU-1", "BLEU-4", "ROUGE-L", "METEOR", "gFID", "diversity", "agreement", "images/s",
              "text tok/s"]
    keys = ["task", "bleu1", "bleu4", "rougeL", "meteor", "gfid", "diversity", "agreement", "images_per_s",
            "text_tokens_per_s"]
    lines = ["# Joint diffusion evaluation", "",
             f"Checkpoint `{payload['checkpoint']}`, cache `{payload['cache']}`, {payload['num_samples']} samples, "
             f"sampler {payload['sampler']}.", "",
             markdown_table(header, [[r.get(k) if k != "task" else r["task"] for k in keys] for r in rows], digits=3)]
    notes = []
    wordnet = [e["report"]["meteor_wordnet"] for e in payload["tasks"].values() if "report" in e]
    if wordnet and not all(wordnet):
        notes.append("METEOR without WordNet synonyms (exact + stem matches only; nltk's WordNet corpus was not "
                     "found): lower than, and not comparable to, published METEOR.")
    if payload.get("random_inception"):
        notes.append("gFID with a random Inception network: a pipeline check, the values mean nothing.")
    if "agreement" in payload:
        a = payload["agreement"]
        notes.append(f"Agreement (cosine): real pairs {a['real_pairs']:.3f}, shuffled real pairs "
                     f"{a['shuffled_real_pairs']:.3f} (chance level).")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when done; 2 for bad input (one line: a missing file, a checkpoint or cache that does not fit), 1 when
    the run cannot go on."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        evaluate(args)
    except FAILURES as error:
        return failure_status(parser.prog, error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
