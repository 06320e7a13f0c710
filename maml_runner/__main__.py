"""``python -m maml_runner`` is the same as the ``maml-run`` console script."""

from maml_runner.cli import main

if __name__ == "__main__":
    main()
