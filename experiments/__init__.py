"""Comparing controllers: trials (one training run each), the comparison that plans and runs them,
the statistics, the tables and the local report. Imports ``gpt``, ``controllers`` and ``dyndrop``; the
command lines in ``runs`` import it, nothing below does.
"""
