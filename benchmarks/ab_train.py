"""Time several training-step variants in one process: ``python -m tokenizer_training.benchmark`` once per variant.

    python benchmarks/ab_train.py --out /tmp/ab --common "--preset large --stage 1 --steps 5 --warmup 3 ..." \\
        --variant baseline "--batch-sizes 32 64" \\
        --variant vit_selective "--batch-sizes 64 --grad-ckpt --grad-ckpt-parts vit_selective+decoder_conv" \\
        --variant upsample_direct "--batch-sizes 32 --upsample direct"

Each variant's arguments are the benchmark's (every ``train.py`` flag in kebab-case, ``--config``, ...: e.g.
``--upsample direct``) after the ``--common`` ones, plus one option applied through ``MedITok.speed_up`` when
the trainer calls it:

  --compile-form whole|regional  torch.compile of the tokenizer ONLY, the loss networks staying eager (in a
                                 variant's arguments; ``train.py --compile --compile-form F`` compiles the
                                 loss networks too)

One process for all variants pays the imports once; each variant builds its own trainer from the same seed
(same weights, same synthetic batch), so their losses can be compared. Results: ``<out>/<variant>/benchmark.json``
as each variant ends, and ``<out>/<variant>/variant.json`` (its options, wall time, an error if it failed).
Inductor's compile workers are shut down after the last variant (see ``evaluation.efficiency``).
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

import torch


def _variant_options(tokens: List[str]):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--compile-form", choices=("whole", "regional"), default=None)
    return p.parse_known_args(tokens)


def run_variant(name: str, common: List[str], extra: List[str], out: Path) -> dict:
    """Run one benchmark with ``MedITok.speed_up`` patched to add this variant's tokenizer options."""
    from tokenizer_training import benchmark
    from meditok.model import MedITok

    options, rest = _variant_options(extra)
    original = MedITok.speed_up

    def speed_up(self, channels_last=False, compile=False, backend="inductor", mode=None, **kwargs):
        if options.compile_form:
            compile = options.compile_form
        return original(self, channels_last=channels_last, compile=compile, backend=backend, mode=mode, **kwargs)

    record = {"variant": name, "args": common + extra, "compile_form": options.compile_form}
    (out / name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    MedITok.speed_up = speed_up
    try:
        torch.manual_seed(0)
        record["rc"] = benchmark.main(common + rest + ["--out", str(out / name)])
    except Exception as error:  # one failing variant must not cost the others
        traceback.print_exc()
        record.update(rc=1, error=f"{type(error).__name__}: {error}")
    finally:
        MedITok.speed_up = original
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["wall_s"] = time.perf_counter() - t0
    (out / name / "variant.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/ab_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder; one sub-folder per variant")
    p.add_argument("--common", default="", help="benchmark arguments shared by every variant (one quoted string)")
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "ARGS"), required=True,
                   help="a variant's name and its own arguments (one quoted string); repeat per variant")
    a = p.parse_args(argv)
    out = Path(a.out)
    failed = 0
    try:
        for name, extra in a.variant:
            print(f"== training variant {name}: {extra}", flush=True)
            failed |= run_variant(name, shlex.split(a.common), shlex.split(extra), out)["rc"] != 0
    finally:
        from evaluation.efficiency import shutdown_compile_workers
        shutdown_compile_workers()
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
