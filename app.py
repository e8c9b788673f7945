"""vitviz studio: `streamlit run app.py`. A router only: page config and navigation (the app map in docs/design.md)."""

import streamlit as st

from vitviz.allocator import tune_malloc
from vitviz.ui import runs

tune_malloc()  # once per process: freed tensor memory stays for the next analysis (vitviz/allocator.py)

# An emoji favicon (Streamlit draws it as an inline SVG) and no page icons: Material icon names make the browser
# fetch each page's favicon from fonts.gstatic.com, and the studio works offline.
st.set_page_config(page_title="vitviz studio", page_icon="🔭", layout="wide")

PAGES = [
    st.Page("vitviz/ui/overview.py", title="Overview", default=True),
    st.Page("vitviz/ui/filters.py", title="Patch filters", url_path="filters"),
    st.Page("vitviz/ui/position.py", title="Position embeddings", url_path="position"),
    st.Page("vitviz/ui/distance.py", title="Attention distance", url_path="distance"),
    st.Page("vitviz/ui/rollout.py", title="Attention rollout", url_path="rollout"),
    st.Page("vitviz/ui/tokens.py", title="Tokens", url_path="tokens"),
    st.Page("vitviz/ui/trust.py", title="Which map to trust?", url_path="trust"),
    st.Page("vitviz/ui/compare.py", title="Compare models", url_path="compare"),
    st.Page("vitviz/ui/train.py", title="Train", url_path="train"),
]

try:
    st.navigation(PAGES).run()
finally:
    # After the page is drawn (or stopped): /train's preset list is read in the background, once per server.
    runs.prefetch_presets()
