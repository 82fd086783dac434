"""Entry point for `ray job submit -- python tune/main.py --config tune/configs/NAME.yaml` (same as `msit tune`)."""

import sys

from msit.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
