"""Print every setting with its default, environment variable and help: python -m config --help."""

import sys

from config.loader import build_parser, load_settings

if __name__ == "__main__":
    build_parser().parse_args(sys.argv[1:])  # --help exits here with the full list
    print(load_settings(sys.argv[1:]))
