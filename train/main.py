"""Entry point for `ray job submit -- python train/main.py --config train/configs/NAME.yaml` (same as `msit train`)."""

import sys

from msit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
