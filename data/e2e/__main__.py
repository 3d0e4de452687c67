"""python -m data.e2e: prepares the data set (data/e2e/prepare.py; --help)."""
from data.e2e.prepare import main
from support.common import run_main

if __name__ == "__main__":
    run_main(main)
