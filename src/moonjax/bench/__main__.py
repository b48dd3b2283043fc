"""``python -m moonjax.bench [flags]`` is ``moonjax bench [flags]``."""

import sys

from moonjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
