"""The error a user can cause here (a path, a flag, a file) and how the evaluator reports it: one line, exit 2."""
import sys

import torch


class UserError(Exception):
    """A mistake the user can fix. The evaluator prints it as `error: <message>` and exits with status 2."""


def run_main(main):
    """Runs a script's main(); a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def device_from_flag(name):
    """torch.device of a --device value; a UserError when it is not a device or is CUDA on a machine without it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (cuda, cpu, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device
