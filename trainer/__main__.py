"""`python -m trainer --config trainer/configs/NAME.yaml [--out DIR] [key=value ...]`

A batch job: it validates the config, the model source and the data (exit code 2 with a one-line
`error: ...` if any is wrong, before training starts), trains, writes checkpoints into OUT and exits.
Rerunning the same command resumes from the newest complete checkpoint in OUT. Under
`torchrun --nproc_per_node N -m trainer ...` it trains with DistributedDataParallel, or with
FSDP2 sharding and sharded checkpoints given `parallel=fsdp`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config

log = logging.getLogger("trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", type=Path, help="YAML config (default: built-in defaults)")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/<config name>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from model.checkpoint import CheckpointError
    from trainer.checkpointing import CheckpointWriteError
    from trainer.data import DataError
    from trainer.loop import prepare, run
    from trainer.nonfinite import DivergedError

    out = args.out or Path("runs") / (args.config.stem if args.config else "default")
    try:
        cfg = load_config(args.config, args.overrides)
        prep = prepare(cfg)
        out.mkdir(parents=True, exist_ok=True)
        # Model construction (reading init_from's weights) also happens before the first step.
        summary = run(prep, out)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"error: --out {out}: {e}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, DivergedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.stopped_early:
        from trainer.preemption import EXIT_CODE

        return EXIT_CODE
    log.info("done: step %d in %s", summary.final_step, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
