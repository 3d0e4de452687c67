"""python -m data.pretrain: prepares the data set (data/pretrain/prepare.py; --help)."""
from data.pretrain.prepare import main
from support.common import run_main

if __name__ == "__main__":
    run_main(main)
