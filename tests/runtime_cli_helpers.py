"""Shared by the runtime's end-to-end tests: in-process CLI calls and tiny training flags."""
from sdec.cli import main

FAST = ("--batch-size", "16", "--eval-every", "2", "--sample-every", "4", "--time-samples", "2",
        "--sample-steps", "4", "--no-progress", "--device", "cpu")


def cli(capsys, *args):
    """Run `sdec ARGS` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err
