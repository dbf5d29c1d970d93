"""Serving shipped models: a web page and a JSON API for top-k predictions (``cli.py serve``)."""
