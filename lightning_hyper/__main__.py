"""``python -m lightning_hyper`` is the same as the ``lightning-hyper`` console script."""
from lightning_hyper.cli import main

if __name__ == "__main__":
    main()
