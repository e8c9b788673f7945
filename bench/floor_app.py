"""The floor under the studio latency figures: what any Streamlit page costs in a new browser session here.

`streamlit run bench/floor_app.py` (started by `bench/app.py`, never by users): `/` draws a heading and a
line of text; `/plotly` also draws one small Plotly heatmap, so its figure includes loading Plotly's
JavaScript (a 4.7 MB module that Streamlit loads on the first chart of every browser session). Nothing of
vitviz is imported.
"""

import streamlit as st


def _text() -> None:
    st.title("Floor: text")
    st.write("A heading and a line of text.")


def _plotly() -> None:
    import plotly.graph_objects as go

    st.title("Floor: one Plotly chart")
    st.plotly_chart(go.Figure(go.Heatmap(z=[[0.0, 1.0], [2.0, 3.0]])))


st.navigation(
    [st.Page(_text, title="Text", url_path="text", default=True), st.Page(_plotly, title="Plotly", url_path="plotly")]
).run()
