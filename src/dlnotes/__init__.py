"""dlnotes: a runnable deep-learning cookbook. Importing the package is cheap: no torch here."""

__version__ = "0.1.0"
