"""`livetower bench peers`: livetower against a widely used Python model server serving the same engine.

Runs `livetower bench slo` with the optimised livetower server and the Ray Serve peer (benchmarks/ray_peer.py:
the same AOTInductor tower package and item index behind Ray Serve's gRPC ingress), the same open-loop load
against each, one after the other on fresh processes: P99 at --rate (default 200 QPS, median of --runs) and
the capacity at P99 < --slo-p99-ms, side by side, with their ratio. Any `bench slo` flag may follow.

    livetower bench peers --catalog DIR [--runs 3] [--sweep 100,200,300,400,500,600,800,1000]
"""

from __future__ import annotations

import sys

from benchmarks import slo

DEFAULTS = {"--configs": "optimised,ray-serve", "--rate": "200", "--out": "bench-results/peers"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    defaults = [x for flag, value in DEFAULTS.items() if flag not in given for x in (flag, value)]
    return slo.main([*defaults, "--skip-overload", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
