"""vitviz studio: `streamlit run app.py`.

Served two ways from this one file:
- `streamlit run app.py` finds the `st.App` below and serves it with uvicorn; the App's start-up
  (`vitviz.ui.startup`) imports torch, timm and the first page before the server reports healthy, so the first
  browser session does not wait for them;
- each browser session runs this file as its script (`__name__ == "__main__"`): a router only, page config and
  navigation over the page list in `vitviz.ui.pages` (the app map in docs/design.md).
"""

import streamlit as st

if __name__ == "__main__":
    from vitviz.allocator import tune_malloc
    from vitviz.ui import pages, runs

    tune_malloc()  # once per process: freed tensor memory stays for the next analysis (vitviz/allocator.py)

    # An emoji favicon (Streamlit draws it as an inline SVG) and no page icons: Material icon names make the
    # browser fetch each page's favicon from fonts.gstatic.com, and the studio works offline.
    st.set_page_config(page_title="vitviz studio", page_icon="🔭", layout="wide")
    navigation = st.navigation(
        [
            st.Page(page.path, title=page.title, url_path=page.url_path or None, default=page.default)
            for page in pages.PAGES
        ]
    )
    try:
        navigation.run()
    finally:
        # After the page is drawn (or stopped): /train's preset list is read in the background, once per server
        # (the server's start-up has usually asked for it already).
        runs.prefetch_presets()
else:
    from vitviz.ui.startup import lifespan

    app = st.App(__file__, lifespan=lifespan)
