"""The experiment runner from a checkout: ``python -m experiments.run`` is ``sersynth run``
(sersynth/runner.py holds its flags)."""
from sersynth.runner import cli

if __name__ == "__main__":
    cli()
