"""`python -m app --runs DIR`: the same as `balora app --runs DIR`."""
import sys

from balora_diffusion.cli import main

sys.exit(main(["app", *sys.argv[1:]]))
