"""One module per ``w2v2`` subcommand: ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``."""
