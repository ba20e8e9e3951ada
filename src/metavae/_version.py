"""The package version, in a module of its own: model files record it, and `models.files` reads it
without importing the package that imports the models."""
__version__ = "0.1.0"
