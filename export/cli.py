"""`nano-export`: the export entry point. The converter arrives with the export issue; until then it says so."""

import sys


def main() -> None:
    sys.stderr.write("nano-export: not available yet: the LiteRT export stage is not implemented in this version\n")
    sys.exit(2)
