"""The `runai` command: one module per group of subcommands; main.py is the entry point."""
