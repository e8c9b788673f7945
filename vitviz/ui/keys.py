"""Session-state keys and URL query parameters, spelled once."""

# URL query parameters (shareable views).
QUERY_MODEL = "model"  # the selected model's key, e.g. bundled:shapes-default
QUERY_COMPARE = "compare"  # repeated: the models on /compare

# Session state.
MODEL = "vv.model"  # key of the selected model (survives page switches)
MODEL_WIDGET = "vv.model.widget"  # the sidebar selectbox's own key
EXTRA_MODELS = "vv.model.extra"  # dict key -> ModelEntry: timm names and uploads added in this session
URL_ADOPTED = "vv.url_adopted"  # the URL's model selection has been read once in this session
UPLOADED_CHECKPOINTS = "vv.model.uploaded"  # file ids of checkpoint uploads already handled
HUB_OFFER = "vv.model.hub_offer"  # a Hugging Face Hub model named in the URL: downloaded only on a click
ADD_MODEL_OPEN = "vv.add.open"  # whether the sidebar's "Add a model" box is open (kept across reruns and errors)
MODEL_MESSAGE = "vv.model.message"  # one-line result of the last add-a-model action: (kind, text)
COMPARE = "vv.compare"  # keys of the models on /compare
COMPARE_WIDGET = "vv.compare.widget"
COMPARE_ADOPTED = "vv.compare.adopted"
COMPARE_TAB = "compare.tab"  # the open tab of /compare (its st.tabs key)
FOLLOW_RUN = "vv.train.follow"  # run id shown in the live view of /train
TRAIN_MESSAGE = "vv.train.message"  # (kind, text) after starting or stopping a run
