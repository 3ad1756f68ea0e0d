"""`python -m pipeline.cost_model calibrate | table | estimate` (the design: docs/design/cost-model.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .counting import calibrate
from .predict import estimate, table
from .spec import COEFFICIENTS_PATH, DTYPE_BYTES, GPUS, Workload


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.cost_model", description=(__doc__ or "").split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="recount FLOPs on the meta device and rewrite the JSON")
    cal.add_argument("--output", default=str(COEFFICIENTS_PATH))
    tab = sub.add_parser("table", help="print the estimate table for one GPU (or all)")
    tab.add_argument("--gpu", choices=sorted(GPUS), help="default: every GPU")
    tab.add_argument("--steps", type=int, default=50)
    tab.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float16")
    est = sub.add_parser("estimate", help="print one estimate as JSON")
    est.add_argument("--gpu", choices=sorted(GPUS), default="rtx4090-24gb")
    est.add_argument("--width", type=int, default=512)
    est.add_argument("--height", type=int, default=512)
    est.add_argument("--frames", type=int, default=16)
    est.add_argument("--steps", type=int, default=50)
    est.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float16")
    est.add_argument("--no-guidance", action="store_true")
    est.add_argument("--decode-chunk-size", type=int, default=1)
    est.add_argument("--cpu-offload", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "calibrate":
        data = calibrate(args.output)
        for stage, fit in data["flops"].items():
            terms = dict(zip(fit["terms"], fit["coefficients"]))
            print(f"{stage:<14} residual {fit['max_relative_residual']:.2g}  {terms}")
        print(f"parameters: {data['parameters']}")
        print(f"wrote {args.output}")
    elif args.command == "table":
        gpus = [GPUS[args.gpu]] if args.gpu else list(GPUS.values())
        print("\n\n".join(table(g, steps=args.steps, dtype=args.dtype) for g in gpus))
    else:
        wl = Workload(
            args.width,
            args.height,
            args.frames,
            args.steps,
            guidance=not args.no_guidance,
            dtype=args.dtype,
            decode_chunk_size=args.decode_chunk_size,
            cpu_offload=args.cpu_offload,
        )
        print(json.dumps(estimate(wl, GPUS[args.gpu]).to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
