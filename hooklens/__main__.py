"""`python -m hooklens ...` is the `hooklens` command."""
import sys

from hooklens.cli import main

sys.exit(main())
