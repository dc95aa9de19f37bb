"""What every command of the project shares on its command line: help that shows the defaults, and --device.

    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__, formatter_class=HelpFormatter)
    add_device(p)
"""
import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written (its example commands), and each flag's default after its help;
    none for a flag that is required, has no default (None), or says its default itself."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_device(p, default_help="cuda if there is a GPU, else cpu"):
    """--device, the same values in every command: cpu, or cuda (the first GPU where one is meant)."""
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help=f"where to run (default: {default_help})")
