"""vitviz studio: `streamlit run app.py`. A router only: page config and navigation (the app map in docs/design.md)."""

import streamlit as st

from vitviz.allocator import tune_malloc

tune_malloc()  # once per process: freed tensor memory stays for the next analysis (vitviz/allocator.py)

# Emoji icons: Streamlit draws them itself; Material icon names would make the browser fetch
# each page's favicon from fonts.gstatic.com, and the studio works offline.
st.set_page_config(page_title="vitviz studio", page_icon="🔭", layout="wide")

PAGES = [
    st.Page("vitviz/ui/overview.py", title="Overview", icon="🏠", default=True),
    st.Page("vitviz/ui/filters.py", title="Patch filters", icon="🧩", url_path="filters"),
    st.Page("vitviz/ui/position.py", title="Position embeddings", icon="📍", url_path="position"),
    st.Page("vitviz/ui/distance.py", title="Attention distance", icon="📏", url_path="distance"),
    st.Page("vitviz/ui/rollout.py", title="Attention rollout", icon="🔍", url_path="rollout"),
    st.Page("vitviz/ui/tokens.py", title="Tokens", icon="🔤", url_path="tokens"),
    st.Page("vitviz/ui/trust.py", title="Which map to trust?", icon="✅", url_path="trust"),
    st.Page("vitviz/ui/compare.py", title="Compare models", icon="⚖️", url_path="compare"),
    st.Page("vitviz/ui/train.py", title="Train", icon="🏋️", url_path="train"),
]

st.navigation(PAGES).run()
