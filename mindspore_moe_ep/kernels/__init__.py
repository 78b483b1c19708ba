"""Compiled AOT kernel libraries live here (built by setup.py from custom_ops/)."""
