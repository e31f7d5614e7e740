"""The package version, in one place: ``emokern.__version__``, the records that banks and reports write, and
setup.py read it from here."""

__version__ = "0.1.0"
