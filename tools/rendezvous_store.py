"""Serve the c10d rendezvous store of a multi-node or elastic torchrun job from a process of its
own, so that it outlives every agent (see megamoe/parallel/rendezvous.py for why).

    python tools/rendezvous_store.py --port 29500 &          # on a host that stays up
    torchrun --nnodes 1:4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-conf is_host=false ...

Prints ``rendezvous store on HOST:PORT`` once it listens, then serves until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys

from megamoe.parallel.rendezvous import rendezvous_store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rendezvous_store.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface)")
    p.add_argument("--port", type=int, default=29500, help="port to listen on (0: a free one, printed)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with rendezvous_store(args.host, args.port) as port:
        print(f"rendezvous store on {args.host}:{port}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
