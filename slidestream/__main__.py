"""``python -m slidestream``."""

from slidestream.cli import main

main()
