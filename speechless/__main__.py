"""`python -m speechless ...`: the same CLI as the `speechless` command."""

from speechless.cli import main

main()
