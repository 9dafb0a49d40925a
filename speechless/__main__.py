"""`python -m speechless` = the `speechless` command."""

from speechless.cli import main

if __name__ == "__main__":
    main()
