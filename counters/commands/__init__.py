"""The ``llama-ref`` subcommands that count: each module has ``add_arguments(parser)`` and ``run(args)``."""
