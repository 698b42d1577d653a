"""`python -m lightning_peft` is the same as `lpeft`."""

from lightning_peft.cli import main

if __name__ == "__main__":
    main()
