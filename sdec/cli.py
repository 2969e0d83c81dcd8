"""The sdec command line: check, fmt, compile, verify (the compiler) and train, eval,
sample, data (the runtime, dispatched to sdec.runtime.cli; the compiler imports nothing else
of the runtime).

User errors in the compiler's commands (bad specs, missing files) print compiler-style
diagnostics and exit 1; the runtime's commands print one line and exit 2 (a bad spec still
gets its full diagnostics). A usage error, a bad option value or an output that cannot be
written is one line and exit 2; Ctrl-C is one line and exit 130. Anything else is a bug and
shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import stat
import sys
import tempfile
import threading
import traceback

from . import __version__
from .backend import MAX_SAMPLES
from .language.diagnostics import SpecError

MAX_SEED = 2 ** 63 - 1
SPEC_HELP = "path to a .sde file, or - for standard input"


class CommandError(Exception):
    """A user error of a compiler command that is not about the spec: one line, exit 2."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _whole_number(text: str, low: int, high: int | None, why: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{why}, got {text}")
    return value


def _samples(text: str) -> int:
    return _whole_number(text, 2, MAX_SAMPLES, f"must be between 2 (a covariance needs two paths) and {MAX_SAMPLES:,}")


def _seed(text: str) -> int:
    return _whole_number(text, 0, MAX_SEED, "must be between 0 and 2**63 - 1")


def _emit(text: str, end: str = "\n") -> None:
    """Print a report on stdout; an unwritable stdout (e.g. /dev/full) is a CommandError."""
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        _silence_stdout()
        raise CommandError(f"cannot write to standard output ({exc.strerror or exc})") from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that what is still buffered cannot fail again at exit."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests) or already closed
        pass
    finally:
        os.close(null)


def _add_check(sub):
    p = sub.add_parser("check", help="parse a spec, prove what can be proved, print the report")
    p.add_argument("spec", help=SPEC_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--mix-tol", type=_positive_float, default=None, metavar="NATS",
                   help="warn when KL(q(y_T|x) || target) per coordinate exceeds this (default 0.01)")
    p.set_defaults(run=_run_check)


def _run_check(args) -> int:
    from .api import analyze, read_spec_bytes, spec_name
    from .checks import MIX_TOL
    from .check_report import check_json, check_sections, diagnostics_text
    result = analyze(read_spec_bytes(args.spec), spec_name(args.spec),
                     args.mix_tol if args.mix_tol is not None else MIX_TOL)
    if args.json:
        _emit(json.dumps(check_json(result), indent=2, ensure_ascii=False))
        return 0 if result.ok else 1
    body, verdict = check_sections(result, "SPEC" if args.spec == "-" else args.spec)  # report: stdout
    if body:
        _emit(body + "\n")
    if result.diagnostics:  # diagnostics: stderr
        _to_stderr(diagnostics_text(result) + "\n")
    _emit(verdict)
    return 0 if result.ok else 1


def _add_fmt(sub):
    p = sub.add_parser("fmt", help="print a spec in canonical form (constants folded, exact values)")
    p.add_argument("spec", help=SPEC_HELP)
    p.set_defaults(run=_run_fmt)


def _run_fmt(args) -> int:
    from .api import parse_file
    from .language.format import format_spec
    _emit(format_spec(parse_file(args.spec)), end="")
    return 0


def _add_compile(sub):
    p = sub.add_parser("compile", help="emit a standalone torch module (-o) or print the lowering report")
    p.add_argument("spec", help=SPEC_HELP)
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the generated Python module here (never the spec itself; written atomically)")
    p.set_defaults(run=_run_compile)


def _run_compile(args) -> int:
    from .api import parse_file
    from .emit.module import generate_source
    from .backend.lower import lower, lowering_report
    if args.output and os.path.exists(args.spec):
        _refuse_input_as_output(args.spec, args.output)
    spec = parse_file(args.spec)
    plan = lower(spec)
    if args.output:
        write_output(args.output, generate_source(plan))
        _emit(f"wrote {args.output}: class Diffusion ({spec.name}, K = {spec.K})")
    else:
        _emit(lowering_report(plan))
    return 0


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _refuse_input_as_output(spec: str, output: str) -> None:
    if _same_file(spec, output):
        raise CommandError(f"-o {output} is the spec being compiled; "
                           "refusing to overwrite it (choose another output, e.g. a .py file)")


def write_output(path: str, text: str) -> None:
    """Write text to path atomically: a temporary file in the same directory, then
    os.replace, so a failure leaves any old file untouched. A path that names something
    other than a regular file (/dev/stdout, a FIFO) is written to directly. Every failure
    is a one-line CommandError."""
    data = text.encode("utf-8")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise CommandError(f"cannot write {path} ({exc.strerror or exc})") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise CommandError(f"cannot write {path}: it is a directory "
                           f"(give a file name, e.g. {os.path.join(path, 'diffusion.py')})")
    if st is not None and not stat.S_ISREG(st.st_mode):  # /dev/stdout, a FIFO, a device
        try:
            with open(path, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise CommandError(f"cannot write {path} ({exc.strerror or exc})") from None
        return
    target = os.path.realpath(path)  # replace the file a symlink points at, not the link
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise CommandError(f"cannot write {path}: the directory {folder} does not exist")
    if st is not None:
        if not os.access(target, os.W_OK):  # a write-protected file stays protected
            raise CommandError(f"cannot write {path} (Permission denied)")
        mode = stat.S_IMODE(st.st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise CommandError(f"cannot write {path} ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _add_verify(sub):
    p = sub.add_parser("verify", help="check the compiled kernels against independent computations")
    p.add_argument("spec", help=SPEC_HELP)
    p.add_argument("--samples", type=_samples, default=20000, help=f"Euler–Maruyama paths, 2 to {MAX_SAMPLES:,} (default 20000)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the simulation and gradient checks, 0 to 2**63 - 1 (default 0)")
    p.set_defaults(run=_run_verify)


def _run_verify(args) -> int:
    import torch

    from .api import parse_file

    from .backend.verify import render_checks, verify
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # K x K work: intra-op threads only add overhead
    spec = parse_file(args.spec)
    checks = verify(spec, samples=args.samples, seed=args.seed)
    _emit(render_checks(spec, checks))
    return 0 if all(c.passed for c in checks) else 1


RUNTIME_COMMANDS = ("train", "eval", "sample", "data")
TORCH_COMMANDS = ("verify",) + RUNTIME_COMMANDS  # (check, fmt and compile never import torch)


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
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # before a command started (the commands catch their own)
        _to_stderr("sdec: interrupted")
        return 130


def _main(argv: list) -> int:
    if argv and argv[0] == "-":  # `sdec -`: check the spec on standard input
        argv = ["check"] + argv
    parser = build_parser()
    if not argv:  # list the commands rather than one line about a missing one
        _to_stderr(parser.format_help().rstrip("\n"))
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help, --version or a usage error: make sure stdout can take it
        try:
            sys.stdout.flush()
        except OSError as exc:
            _silence_stdout()
            if not isinstance(exc, BrokenPipeError):
                _to_stderr(f"sdec: error: cannot write to standard output ({exc.strerror or exc})")
                return 2
        raise
    try:
        if args.command in TORCH_COMMANDS:
            _import_holding_sigint("torch")
    except KeyboardInterrupt:
        _to_stderr(f"sdec {args.command}: interrupted")
        return 130
    if args.command in RUNTIME_COMMANDS:
        return _run_runtime(args)
    try:
        return args.run(args)
    except SpecError as exc:
        _to_stderr(exc.render())
        return 1
    except CommandError as exc:
        _to_stderr(f"sdec {args.command}: error: {exc}")
        return 2
    except BrokenPipeError:  # e.g. `sdec check spec | head`: the reader went away
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        _to_stderr(f"sdec {args.command}: interrupted")
        return 130


def _import_holding_sigint(name: str) -> None:
    """Import a module with SIGINT held (blocked) until the import is done, then delivered.

    torch's C initialisation imports numpy and discards any error raised inside it: a
    KeyboardInterrupt there is lost (the command runs on as if never interrupted) or leaves
    numpy half-imported (a later AttributeError); both were seen with Ctrl-C in the first
    second of `sdec verify`.  Held, the interrupt arrives right after the import, where the
    command's handler turns it into one line and exit 130.  Main thread, POSIX only."""
    if name in sys.modules or not hasattr(signal, "pthread_sigmask") \
            or threading.current_thread() is not threading.main_thread():
        importlib.import_module(name)
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        importlib.import_module(name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _to_stderr(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:  # nowhere left to say it; the exit status still does
        pass


def _run_runtime(args) -> int:
    """A runtime command's exit status. Under torchrun the rank ends here, through
    sdec.runtime.distributed.leave (which says why), also after an unexpected error."""
    from .runtime import distributed
    try:
        code = _runtime_status(args)
    except Exception:  # a bug: its traceback, then the same way out as any other status
        if distributed.joined():
            traceback.print_exc()
            distributed.leave(1)
        raise
    distributed.leave(code)
    return code


def _runtime_status(args) -> int:
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
