"""Sample from a trained joint diffusion model: text→image, image→report or joint image + report.

    # text → image, one image per prompt, label = modality
    python -m generation.diffusion.sample --checkpoint runs/diffusion_tiny \\
        --task text_to_image --label ct --prompt "Axial CT of the thorax" --num 4 --out runs/diffusion_tiny/gen
    # image → report for the first rows of a token cache
    python -m generation.diffusion.sample --checkpoint ... --task image_to_text --cache runs/diffusion_tiny/tokens/examples_train --num 8
    # joint: images and their reports from a label alone
    python -m generation.diffusion.sample --checkpoint ... --task joint --label mri --num 8

Writes ``OUT/<task>.png`` (images decoded by ``--meditok``, default the cache's tokenizer when given; the
prompt — joint: the generated report — under each image, the task and label above the grid),
``OUT/<task>.json`` (reports, prompts, labels) and ``OUT/<task>_ids.pt``; prints images/s and text tokens/s.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from generation.diffusion.sampler import METHODS, SAMPLE_TASKS, SamplerOptions, sample
from generation.diffusion.loading import load_for_inference
from training.options import FAILURES, failure_status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m generation.diffusion.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="diffusion checkpoint file, or a run folder (--out of the trainer: its newest checkpoint, "
                        "ckpt-*.pth, or checkpoints/latest.pt of older runs)")
    p.add_argument("--task", required=True, choices=SAMPLE_TASKS)
    p.add_argument("--prompt", nargs="*", default=None, help="text_to_image: report text(s); cycled to --num")
    p.add_argument("--label", default=None, help="modality label name (default: the null label, unconditional)")
    p.add_argument("--cache", default=None, help="image_to_text: token cache whose first --num rows are described")
    p.add_argument("--meditok", default=None, help="MedITok to decode images (default: the cache's tokenizer source)")
    p.add_argument("--num", type=int, default=4, help="samples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--method", default="confidence", choices=METHODS)
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="draw only among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale >= 0 (1 = none, one forward pass per step; 0 = unconditional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/diffusion_samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def open_inputs(args: argparse.Namespace, names: Sequence[str], payload: dict):
    """The label index (the null label when none), the token cache (image_to_text) and the decoder (a MedITok,
    when one is named or the cache records one), after checking the task has what it needs."""
    cache = None
    if args.label is not None and args.label not in names:
        raise ValueError(f"--label {args.label!r} is not one of the model's labels {list(names)}")
    if args.cache:
        from generation.token_cache import TokenCache
        cache = TokenCache(args.cache, label_names=names)
        if payload.get("tokenizer_fingerprint") not in (None, cache.fingerprint):
            raise ValueError(f"{args.cache} holds ids of another MedITok than {payload['_path']} was trained on")
    if args.task == "text_to_image" and not args.prompt:
        raise ValueError("--task text_to_image needs --prompt TEXT [TEXT ...]")
    if args.task == "image_to_text" and cache is None:
        raise ValueError("--task image_to_text needs --cache (the images, as MedITok ids)")
    decoder_source = args.meditok or (cache.manifest.get("tokenizer_source") if cache is not None else None)
    decoder = None
    if decoder_source and args.task != "image_to_text":
        from meditok import load_meditok
        decoder = load_meditok(decoder_source).to(torch.device(args.device)).eval()
    return cache, decoder


def draw(args: argparse.Namespace, model, codec, cache, label: int, options: SamplerOptions) -> dict:
    """Sample ``--num`` items in batches: reports, image ids, prompts, labels and the sampling seconds (device
    synchronised around each call)."""
    device, names = torch.device(args.device), model.config.condition_names
    generator = torch.Generator(device=device).manual_seed(args.seed)
    texts, images, prompts, labels_out, seconds = [], [], [], [], 0.0
    for start in range(0, args.num, args.batch_size):
        b = min(args.batch_size, args.num - start)
        labels = torch.full((b,), label, device=device)
        text_ids = image_ids = None
        if args.task == "text_to_image":
            batch_prompts = [args.prompt[(start + i) % len(args.prompt)] for i in range(b)]
            prompts += batch_prompts
            text_ids = codec.encode(batch_prompts, source="prompts").to(device)
        if args.task == "image_to_text":
            rows = [cache[i] for i in range(start, min(start + b, len(cache)))]
            if not rows:
                break
            image_ids = torch.stack([r["ids"] for r in rows]).to(device)
            labels = torch.tensor([r["label"] for r in rows], device=device)
            prompts += [r["caption"] for r in rows]
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        out_text, out_image = sample(model, task=args.task, labels=labels, text_ids=text_ids, image_ids=image_ids,
                                     options=options, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - began
        texts += codec.decode(out_text)
        images.append(out_image.cpu())
        labels_out += [names[i] if i < len(names) else "null" for i in labels.tolist()]
    return {"texts": texts, "ids": torch.cat(images), "prompts": prompts, "labels": labels_out, "seconds": seconds}


def write_outputs(args: argparse.Namespace, model, drawn: dict, decoder) -> dict:
    """``<task>_ids.pt``, ``<task>.json`` (the record returned) and, with a decoder, the captioned ``<task>.png``;
    prints the speed."""
    texts, ids, prompts, seconds = drawn["texts"], drawn["ids"], drawn["prompts"], drawn["seconds"]
    n, out_dir = len(texts), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(ids, out_dir / f"{args.task}_ids.pt")
    record = {"task": args.task, "labels": drawn["labels"], "steps": args.steps, "method": args.method,
              "cfg_scale": args.cfg_scale, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
              "seconds": seconds}
    if args.task == "text_to_image":
        record["prompts"] = prompts
    if args.task == "image_to_text":
        record.update(references=prompts, reports=texts)
    if args.task == "joint":
        record["reports"] = texts
    if args.task != "image_to_text":
        record["images_per_s"] = n / seconds
        print(f"[sample] {args.task}: {n} images in {seconds:.2f} s = {n / seconds:.2f} images/s ({args.steps} steps)")
    if args.task != "text_to_image":
        record["text_tokens_per_s"] = n * model.config.text_len / seconds
        print(f"[sample] {args.task}: {n} reports, {record['text_tokens_per_s']:.0f} text tokens/s ({args.steps} steps)")
    if decoder is not None:
        from generation.figures import captioned_grid
        device = torch.device(args.device)
        pixels = torch.cat([decoder.idx_to_img(ids[s:s + 16].to(device), model.config.grid).cpu()
                            for s in range(0, len(ids), 16)])
        # text → image: the prompt under each image; joint: the report generated with it
        captions = prompts if args.task == "text_to_image" else texts
        labels = drawn["labels"]
        title = f"{args.task.replace('_', ' ')}, label {labels[0] if labels else 'null'}, {args.steps} steps"
        captioned_grid((pixels.float() + 1) / 2, captions, title, out_dir / f"{args.task}.png", columns=min(8, n),
                       min_tile=128)
        record["grid"] = str(out_dir / f"{args.task}.png")
    (out_dir / f"{args.task}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[sample] wrote {out_dir / (args.task + '.json')}")
    return record


def run(args: argparse.Namespace) -> dict:
    options = SamplerOptions(steps=args.steps, method=args.method, temperature=args.temperature,
                             cfg_scale=args.cfg_scale, top_k=args.top_k, top_p=args.top_p)  # bad values: before loading
    model, codec, payload = load_for_inference(args.checkpoint, torch.device(args.device))
    names = model.config.condition_names
    cache, decoder = open_inputs(args, names, payload)
    label = names.index(args.label) if args.label is not None else model.null_label
    return write_outputs(args, model, draw(args, model, codec, cache, label, options), decoder)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when done; 2 for bad input (one line: a missing file, a checkpoint or cache that does not fit), 1 when
    the run cannot go on."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except FAILURES as error:
        return failure_status(parser.prog, error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
