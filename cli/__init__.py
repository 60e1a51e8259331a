"""The command line, above every stage: `nano` (cli.main) and `nano-export` (cli.export). Each module parses one
stage's options and calls that stage's library; no logic lives only here. A new stage adds a module and one line
in cli.main, never an edit to nano/."""
