"""vitviz studio: `streamlit run app.py`. A router only: page config and navigation over the page list in
`vitviz.ui.pages` (the app map in docs/design.md)."""

import streamlit as st

from vitviz.allocator import tune_malloc
from vitviz.ui import pages, runs

tune_malloc()  # once per process: freed tensor memory stays for the next analysis (vitviz/allocator.py)

# An emoji favicon (Streamlit draws it as an inline SVG) and no page icons: Material icon names make the browser
# fetch each page's favicon from fonts.gstatic.com, and the studio works offline.
st.set_page_config(page_title="vitviz studio", page_icon="🔭", layout="wide")

PAGES = [
    st.Page(page.path, title=page.title, url_path=page.url_path or None, default=page.default) for page in pages.PAGES
]

try:
    st.navigation(PAGES).run()
finally:
    # After the page is drawn (or stopped): /train's preset list is read in the background, once per server.
    runs.prefetch_presets()
