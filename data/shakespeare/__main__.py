"""python -m data.shakespeare: prepares the data set (data/shakespeare/prepare.py; --help)."""
from data.shakespeare.prepare import main
from support.common import run_main

if __name__ == "__main__":
    run_main(main)
