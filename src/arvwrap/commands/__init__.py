"""The subcommands of arv-wrap, one module per group; each function takes the
parsed options and the remaining words and returns the exit status."""
