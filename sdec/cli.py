"""The sdec command line: check, fmt, compile, verify (the compiler) and train, eval,
sample, data (the runtime, dispatched to sdec.runtime.cli; the compiler imports nothing else
of the runtime).

User errors in the compiler's commands (bad specs, missing files) print compiler-style
diagnostics and exit 1; the runtime's commands print one line and exit 2 (a bad spec still
gets its full diagnostics). A usage error is one line and exit 2. Anything else is a bug and
shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .diagnostics import SpecError


def _add_check(sub):
    p = sub.add_parser("check", help="parse a spec, prove what can be proved, print the report")
    p.add_argument("spec", help="path to a .sde file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--mix-tol", type=float, default=None, metavar="NATS",
                   help="warn when KL(q(y_T|x) || target) per coordinate exceeds this (default 0.01)")
    p.set_defaults(run=_run_check)


def _run_check(args) -> int:
    from .api import analyze, read_spec_bytes
    from .checks import MIX_TOL
    from .report_text import check_json, check_text
    data = read_spec_bytes(args.spec)
    result = analyze(data, args.spec, args.mix_tol if args.mix_tol is not None else MIX_TOL)
    if args.json:
        print(json.dumps(check_json(result), indent=2, ensure_ascii=False))
    else:
        print(check_text(result))
    return 0 if result.ok else 1


def _add_fmt(sub):
    p = sub.add_parser("fmt", help="print a spec in canonical form (constants folded, exact values)")
    p.add_argument("spec")
    p.set_defaults(run=_run_fmt)


def _run_fmt(args) -> int:
    from .api import parse_file
    from .printer import format_spec
    sys.stdout.write(format_spec(parse_file(args.spec)))
    return 0


def _add_compile(sub):
    p = sub.add_parser("compile", help="emit a standalone torch module (-o) or print the lowering report")
    p.add_argument("spec")
    p.add_argument("-o", "--output", help="write the generated Python module here")
    p.set_defaults(run=_run_compile)


def _run_compile(args) -> int:
    from .api import parse_file
    from .emit.module import generate_source
    from .lower import lower, lowering_report
    spec = parse_file(args.spec)
    plan = lower(spec)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(generate_source(plan))
        print(f"wrote {args.output}: class Diffusion ({spec.name}, K = {spec.K})")
    else:
        print(lowering_report(plan))
    return 0


def _add_verify(sub):
    p = sub.add_parser("verify", help="check the compiled kernels against independent computations")
    p.add_argument("spec")
    p.add_argument("--samples", type=int, default=20000, help="Euler–Maruyama paths (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_verify)


def _run_verify(args) -> int:
    from .api import parse_file
    import os

    import torch

    from .verify import render_checks, verify
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # K x K work: intra-op threads only add overhead
    spec = parse_file(args.spec)
    checks = verify(spec, samples=args.samples, seed=args.seed)
    print(render_checks(spec, checks))
    return 0 if all(c.passed for c in checks) else 1


RUNTIME_COMMANDS = ("train", "eval", "sample", "data")


def build_parser() -> argparse.ArgumentParser:
    from .runtime.cli import OneLineParser, add_commands
    parser = OneLineParser(prog="sdec", description="A compiler for multivariate linear diffusions, "
                           "and a runtime that trains score models on them.")
    parser.add_argument("--version", action="version", version=f"sdec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_check, _add_fmt, _add_compile, _add_verify):
        add(sub)
    add_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in RUNTIME_COMMANDS:
        return _run_runtime(args)
    try:
        return args.run(args)
    except SpecError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `sdec check spec | head`: the reader went away
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run_runtime(args) -> int:
    from .runtime.cli import report, user_errors
    try:
        return args.run(args)
    except SpecError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except user_errors() as exc:
        return report(exc, args.command)
    except KeyboardInterrupt:
        print(f"sdec {args.command}: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
