"""`python -m taskapp.cli`: the `taskapp` command."""

from taskapp.cli.parser import main

main()
