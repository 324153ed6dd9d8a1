"""``python -m moe_fx demo`` (or ``moe-fx demo``): see moe_fx/demo.py."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a small MoE model on N ranks and check it against eager")
    demo.add_argument("--ep", type=int, default=2, help="ranks in the expert-parallel group (default 2)")
    demo.add_argument("--model", default="auto", choices=["auto", "mixtral", "builtin"],
                      help="mixtral: a tiny transformers Mixtral; builtin: a plain-PyTorch MoE "
                           "(auto: mixtral when transformers is installed)")
    demo.add_argument("--lowering", default="auto", choices=["auto", "allgather", "all2allv", "mc2"])
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    demo.add_argument("--inner-backend", default="inductor")
    demo.add_argument("--tokens", type=int, default=12, help="tokens on rank 0; rank r gets tokens + 5*r")
    args = parser.parse_args(argv)
    from moe_fx.demo import run_demo

    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
