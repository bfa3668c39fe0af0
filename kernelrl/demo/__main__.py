"""``python -m kernelrl.demo``: the same as ``kernelrl demo`` (kernelrl.demo.pipeline)."""

import sys

from kernelrl.demo.pipeline import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.demo"))
