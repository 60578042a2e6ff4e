"""The error a user can cause here (a path, a flag, a file) and how the evaluator reports it: one line, exit 2."""
import sys


class UserError(Exception):
    """A mistake the user can fix. The evaluator prints it as `error: <message>` and exits with status 2."""


def run_main(main):
    """Runs a script's main(); a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
