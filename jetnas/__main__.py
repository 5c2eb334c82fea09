"""`python -m jetnas ...` is the `jetnas` command."""

from jetnas.cli import main

main()
