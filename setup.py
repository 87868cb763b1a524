# All metadata lives in setup.cfg; this shim serves tools that still run setup.py.
from setuptools import setup

setup()
