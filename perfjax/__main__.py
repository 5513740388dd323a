"""`python -m perfjax ...`: the `perfjax` command (perfjax/cli.py)."""
from perfjax import cli

if __name__ == "__main__":
  cli.main()
