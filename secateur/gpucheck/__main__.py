"""`python3 -m secateur.gpucheck --out DIR [--allow-cpu --small]`: see secateur/gpucheck/run.py."""
import sys

from secateur.gpucheck.run import main

if __name__ == "__main__":
    sys.exit(main())
