"""vitviz studio: `streamlit run app.py`. A router only: page config and navigation (the app map in docs/design.md)."""

import streamlit as st

from vitviz.allocator import tune_malloc

tune_malloc()  # once per process: freed tensor memory stays for the next analysis (vitviz/allocator.py)

st.set_page_config(page_title="vitviz studio", page_icon=":material/visibility:", layout="wide")

PAGES = [
    st.Page("vitviz/ui/overview.py", title="Overview", icon=":material/home:", default=True),
    st.Page("vitviz/ui/filters.py", title="Patch filters", icon=":material/grid_view:", url_path="filters"),
    st.Page("vitviz/ui/position.py", title="Position embeddings", icon=":material/apps:", url_path="position"),
    st.Page("vitviz/ui/distance.py", title="Attention distance", icon=":material/scatter_plot:", url_path="distance"),
    st.Page("vitviz/ui/rollout.py", title="Attention rollout", icon=":material/image_search:", url_path="rollout"),
    st.Page("vitviz/ui/tokens.py", title="Tokens", icon=":material/token:", url_path="tokens"),
    st.Page("vitviz/ui/trust.py", title="Which map to trust?", icon=":material/verified:", url_path="trust"),
    st.Page("vitviz/ui/compare.py", title="Compare models", icon=":material/compare:", url_path="compare"),
    st.Page("vitviz/ui/train.py", title="Train", icon=":material/model_training:", url_path="train"),
]

st.navigation(PAGES).run()
