"""`torchrun ... -m trainer.elastic ROUND_DIR/spec.json`: a round's worker under an external elastic launcher."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from trainer.elastic.files import load_spec
from trainer.elastic.worker import RoundSpec, latest_checkpoint, worker_main


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nnodes MIN:MAX --rdzv-backend c10d ... -m trainer.elastic ROUND_DIR/spec.json`: the same
    worker under an external elastic launcher (multi-node, deploy/k8s/). The round dir must be on storage every
    node mounts. A worker restarted by torchrun (after a re-rendezvous, maybe with fewer nodes) resumes from the
    newest epoch checkpoint; the round is done when state_epoch<epochs>.pt exists."""
    p = argparse.ArgumentParser(prog="python -m trainer.elastic", description=main.__doc__)
    p.add_argument("spec", type=Path, help="a RoundSpec as JSON (the launcher writes ROUND_DIR/spec.json)")
    args = p.parse_args(argv)
    spec: RoundSpec = load_spec(args.spec, RoundSpec)
    if (done := latest_checkpoint(Path(spec.out_dir))) is not None:
        spec = dataclasses.replace(spec, state_path=str(done[0]), start_epoch=done[1])
    # torchrun's restart count is the attempt (the fault hook's attempt 0 = the first start only).
    spec = dataclasses.replace(spec, attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    if spec.start_epoch < spec.epochs:
        worker_main(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
