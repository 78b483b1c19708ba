"""Worker scripts for the multi-process tests and the launcher that runs them (launch.py)."""
