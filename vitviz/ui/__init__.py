"""The Streamlit studio: one module per page (run by `app.py`'s navigation), shared widgets, and the glue
they need (model and sample discovery, cached analyses, downloads, training subprocesses).

This package is the only part of vitviz that imports streamlit; pages read widgets, call the core, draw.
"""
