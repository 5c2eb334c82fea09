"""The functions behind `jetnas` subcommands (the table is in `jetnas.cli`). Each returns a dict, printed as the
last stdout line in JSON."""
