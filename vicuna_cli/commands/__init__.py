"""One thin module per subcommand: parse flags, build one config, call the core, render."""
