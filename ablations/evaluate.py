"""Evaluate a run's checkpoint on another split or under another test protocol, without retraining.

    python ablations/evaluate.py runs/RUN                                   # last checkpoint, val, the run's protocol
    python ablations/evaluate.py runs/RUN --eval-scales 0.75,1.0,1.25 --eval-flip
    python ablations/evaluate.py runs/RUN --split test --checkpoint best --data-root /data/camvid

Writes RUN/evaluations/<split>-<protocol>-<hash>.json (a protocol is named from its settings:
whole, slide-w768-s512, ms0.75-1-1.25-flip, ...; `make_tables.py --split S --protocol NAME` tabulates it).
The same (checkpoint, split, protocol) is evaluated once: a second call prints the stored result.
Exit status: 0 done, 2 usage or data error (one line naming the thing).
"""

import argparse
import sys
from pathlib import Path

from danet.config import EXIT_OK, EXIT_USAGE, PROTOCOL_FIELDS, UsageError
from danet.launch.contract import BoolFlag, OneLineErrorParser, parse_float_list


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="ablations/evaluate.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (holding summary.json)")
    parser.add_argument("--checkpoint", default="last", help="last (default), best, or a checkpoint path")
    parser.add_argument("--split", default="", help="the split to score (default: the run's val split)")
    parser.add_argument("--eval-mode", choices=["whole", "slide"], help="whole image or sliding window")
    parser.add_argument("--eval-window", type=int, help="sliding window side")
    parser.add_argument("--eval-stride", type=int, help="sliding window stride")
    parser.add_argument("--eval-scales", type=parse_float_list, metavar="LIST", help="test scales, e.g. 0.75,1.0,1.25")
    parser.add_argument("--eval-flip", "--no-eval-flip", action=BoolFlag, nargs="?", metavar="BOOL",
                        help="average with the horizontally flipped prediction")
    parser.add_argument("--data-root", default="", help="dataset folder (default: the run's own)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="compute again even if this evaluation exists")
    parser.add_argument("--wandb", choices=["online", "offline"],
                        help="also log it to the W&B run it evaluates, under eval/<split>/<protocol>/")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    protocol = {name: getattr(args, name) for name in PROTOCOL_FIELDS if getattr(args, name) is not None}

    from danet.data import DataError  # torch: only once an evaluation is asked for
    from danet.evaluation import EvaluationRequest, evaluate_run, log_to_wandb
    from danet.runner import one_line

    request = EvaluationRequest(args.checkpoint, args.split, protocol, args.data_root, args.device)
    try:
        record, path, fresh = evaluate_run(args.run_dir, request, overwrite=args.overwrite)
        if args.wandb:
            print(f"logged to W&B run {log_to_wandb(args.run_dir, record, args.wandb)}")
    except (UsageError, DataError, ValueError) as error:
        print(f"{parser.prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    stored = "" if fresh else " (stored earlier; --overwrite to compute again)"
    print(f"{record['split']} {record['protocol']} mIoU {record['miou']:.4f} (checkpoint {record['checkpoint']}, "
          f"iteration {record['checkpoint_iteration']}){stored}  record: {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
