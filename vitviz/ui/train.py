"""Page `/train`: start a training or fine-tuning run as a subprocess, follow its curves live, stop it, and
list the runs. Finished checkpoints appear in every model picker (they are discovered in the runs folder)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from vitviz import runs as run_folders
from vitviz.data import folder as folder_data
from vitviz.errors import VitvizError
from vitviz.plots import interactive
from vitviz.ui import catalog, exports, keys, runs, widgets
from vitviz.ui.catalog import ModelEntry

REFRESH_SECONDS = 2.0
ACTIVE = ("running", "starting")
RESUMABLE = ("stopped", "interrupted")  # stopped on purpose, or killed: --resume continues from the saved state


def render() -> None:
    widgets.model_sidebar()
    st.title("Train")
    st.caption(
        "Runs start as separate processes (python -m training), so the studio stays responsive and a run "
        "survives a closed browser. Each run writes its folder under the runs folder: "
    )
    st.code(str(catalog.runs_dir()), language=None)
    run_ids = _run_ids()
    alive = frozenset(run_id for run_id in run_ids if _status(run_id) in ACTIVE)
    # While any run is alive, the runs table and the live view re-read status.json every few seconds.
    refresh = REFRESH_SECONDS if alive else None
    form_col, runs_col = st.columns([2, 3])
    with form_col:
        _start_form()
    with runs_col:
        st.fragment(_runs_table, run_every=refresh)(alive)
    follow = st.session_state.get(keys.FOLLOW_RUN)
    if follow not in run_ids:  # a run folder removed since, or none followed yet
        follow = run_ids[0] if run_ids else None
    if follow is None:  # the runs table already says there are none
        return
    st.divider()
    st.session_state["train.follow.widget"] = follow
    chosen = st.selectbox("Follow run", run_ids, key="train.follow.widget", on_change=_on_follow)
    st.session_state[keys.FOLLOW_RUN] = chosen
    live = st.fragment(_live_view, run_every=refresh)
    live(chosen, chosen in alive)


def _on_follow() -> None:
    st.session_state[keys.FOLLOW_RUN] = st.session_state["train.follow.widget"]


def _run_ids() -> list[str]:
    """The runs folder's runs, newest first, then runs started here whose folder does not exist yet."""
    run_ids = [p.name for p in run_folders.list_run_folders(catalog.runs_dir())]
    return run_ids + [run_id for run_id in runs.started_ids() if run_id not in run_ids]


def _status(run_id: str, info: run_folders.RunInfo | None = None) -> str:
    """The run's status as status.json says now, completed by what this app knows about the processes it
    started: a process started (or resumed) here that has not written status.json yet is "starting"."""
    info = info or run_folders.run_info(catalog.runs_dir() / run_id)
    process = runs.started_here(run_id)
    if process is None:
        return info.status
    code = process.poll()
    if code is None:
        if info.status in ACTIVE:
            return info.status
        started = runs.started_at(run_id) or 0.0
        # What status.json says was written before this process started (a resumed run's old "stopped").
        return "starting" if info.status == "unknown" or (info.updated or 0.0) < started else info.status
    if info.status in ("running", "starting", "unknown") and code != 0:
        return f"exited ({code})"
    return info.status


STRATEGIES = {
    "full": "Everything",
    "linear": "Only the new head",
    "freeze": "All but the first K blocks",
    "lora": "LoRA adapters and the head",
}
PRESET_DATA = "preset"  # the data set choice that passes no --dataset
FOLDER_DATA = "folder"
DATASETS = (PRESET_DATA, "shapes", "digits", "mnist", FOLDER_DATA)


@dataclass(frozen=True)
class FinetuneChoice:
    """What the fine-tune controls above the form chose: the base, the data set and what trains."""

    entry: ModelEntry | None
    dataset: str | None  # None: the preset's; else a name or folder:PATH
    dataset_error: str | None  # why the chosen folder cannot be trained on
    strategy: str


def _start_form() -> None:
    st.markdown("##### Start a run")
    presets = runs.available_presets()
    if not presets:
        st.warning("The training backend (training/) is not available in this installation.")
        return
    command = (
        st.segmented_control(
            "Kind",
            ("train", "finetune"),
            default="train",
            key="train.command",
            format_func=lambda c: {"train": "From scratch", "finetune": "Fine-tune"}[c],
        )
        or "train"
    )
    default_preset = "finetune" if command == "finetune" else "shapes-default"
    # Outside the form, so that choosing a preset updates its defaults and the run-id placeholder at once.
    preset = st.selectbox(
        "Preset",
        presets,
        index=presets.index(default_preset) if default_preset in presets else 0,
        key=f"train.preset.{command}",
    )
    # Also outside the form: a folder is checked as soon as it is typed, and the strategy decides the inputs below.
    choice = _finetune_choice() if command == "finetune" else None
    img_side, strategy, lora_rank = 0, None, None
    with st.form(f"train.form.{command}", border=True):
        if choice is not None:
            img_side, strategy, lora_rank = _finetune_inputs(choice.strategy)
        overrides = st.text_area(
            "Overrides, one KEY=VALUE per line",
            key="train.overrides",
            height=90,
            placeholder="e.g. epochs=3 (one per line)",
            help="Any field of the preset's config by its dotted name, e.g. optim.lr=1e-3 or model.depth=4. "
            "See the preset's defaults below.",
        )
        id_col, steps_col = st.columns(2)
        run_id = id_col.text_input("Run id (optional)", key="train.run_id", placeholder=f"{preset}-<date>-<time>")
        max_steps = steps_col.number_input("Stop after steps (0: no limit)", 0, 10_000_000, 0, key="train.max_steps")
        submitted = st.form_submit_button("Start", type="primary", icon=":material/play_arrow:")
    message_slot = st.empty()  # right under the Start button, where the user looks after clicking it
    message = st.session_state.pop(keys.TRAIN_MESSAGE, None)
    if message is not None:
        (message_slot.success if message[0] == "success" else message_slot.error)(widgets.plain(message[1]))
    with st.expander(f"Preset defaults: {preset}"):
        config = runs.preset_config(preset)
        if config is not None:
            st.json(config, expanded=1)
    if not submitted:
        return
    if choice is not None and choice.dataset_error is not None:
        widgets.show_error(f"Not started: {choice.dataset_error}", message_slot)
        return
    entry = choice.entry if choice is not None else None
    try:
        request = runs.RunRequest(
            command=command,
            preset=preset,
            run_id=run_id.strip() or run_folders.new_run_id(preset, catalog.runs_dir()),
            runs_dir=catalog.runs_dir(),
            overrides=runs.parse_overrides(overrides),
            source=entry.source if entry is not None else None,
            img_size=(int(img_side), int(img_side)) if img_side else None,
            max_steps=int(max_steps) or None,
            dataset=choice.dataset if choice is not None else None,
            strategy=strategy,
            lora_rank=lora_rank,
            pretrained=entry is not None and entry.pretrained,
        )
    except VitvizError as exc:
        widgets.show_error(f"Not started: {exc}", message_slot)
        return
    _launch(request, message_slot)


def _finetune_choice() -> FinetuneChoice:
    """The base model (any model the picker offers), the data set (a folder is validated here) and the strategy."""
    entries = widgets.picker_entries()
    keys_ = [e.key for e in entries]
    selected = st.session_state.get(keys.MODEL)
    base = st.selectbox(
        "Base model",
        keys_,
        index=keys_.index(selected) if selected in keys_ else 0,
        key="train.source",
        format_func=lambda k: next((e.label for e in entries if e.key == k), k),
        help="Any model of the picker: bundled, runs, timm and Hugging Face models added in the sidebar. "
        "Its head is replaced by one for the data set's classes.",
    )
    entry = next((e for e in entries if e.key == base), None)
    if entry is None:
        st.warning("There is no model to fine-tune yet.")
    data = st.selectbox(
        "Data set",
        DATASETS,
        key="train.dataset",
        format_func=lambda d: {PRESET_DATA: "the preset's", FOLDER_DATA: "an image folder on the server"}.get(d, d),
    )
    dataset, error = (None if data == PRESET_DATA else data), None
    if data == FOLDER_DATA:
        path = st.text_input(
            "Image folder on the server",
            key="train.folder",
            placeholder="/data/flowers",
            help="One subfolder per class (or train/ and val/ folders holding them).",
        )
        try:
            summary = folder_data.summarize_folder(path)
        except VitvizError as exc:
            error = str(exc)
            widgets.show_error(exc)
        else:
            dataset = f"folder:{summary.root}"
            st.success(widgets.plain(summary.describe()))
    strategy = st.segmented_control(
        "What trains", tuple(STRATEGIES), default="full", key="train.strategy", format_func=STRATEGIES.get
    )
    return FinetuneChoice(entry=entry, dataset=dataset, dataset_error=error, strategy=strategy or "full")


def _finetune_inputs(strategy: str) -> tuple[int, str, int | None]:
    """The form's fine-tune inputs: (new input side or 0, the --strategy value, the LoRA rank or None)."""
    size_col, param_col = st.columns(2)
    img_side = size_col.number_input(
        "New input size in px (0 keeps it)",
        0,
        1024,
        0,
        8,
        key="train.img",
        help="A multiple of the patch size; the position embeddings are resampled.",
    )
    if strategy == "freeze":
        frozen = param_col.number_input(
            "Frozen blocks K", 1, 64, 1, key="train.freeze", help="The patch embedding and the first K blocks."
        )
        return int(img_side), f"freeze:{int(frozen)}", None
    if strategy == "lora":
        rank = param_col.number_input("LoRA rank", 1, 256, 8, key="train.lora_rank", help="The adapters' rank r.")
        return int(img_side), "lora", int(rank)
    return int(img_side), strategy, None


def _launch(request: runs.RunRequest, message_slot: object) -> None:
    """Check the request with the backend's own parser, start its process and follow it."""
    try:
        with st.spinner("Checking the settings…"):
            runs.check_request(request)  # the backend's own parser: a bad override never starts a run
        runs.start_run(request)
    except VitvizError as exc:
        widgets.show_error(f"Not started: {exc}", message_slot)
        return
    except OSError as exc:
        widgets.show_error(f"Not started: could not start the training process: {exc}", message_slot)
        return
    st.session_state[keys.FOLLOW_RUN] = request.run_id
    st.session_state[keys.TRAIN_MESSAGE] = ("success", f"Started run {request.run_id}.")
    st.rerun()


def _runs_table(was_alive: frozenset[str]) -> None:
    """Every run and its status, read afresh on every rerun (and every few seconds while a run is alive)."""
    st.markdown("##### Runs")
    run_ids = _run_ids()
    if not run_ids:
        st.caption("No runs yet: start one with the form on the left.")
        return
    rows = []
    alive = set()
    for run_id in run_ids:
        info = run_folders.run_info(catalog.runs_dir() / run_id)
        status = _status(run_id, info)
        if status in ACTIVE:
            alive.add(run_id)
        rows.append(
            {
                "run": run_id,
                "preset": info.preset or "",
                "status": status,
                "progress": info.fraction,
                "epoch": f"{info.epoch}/{info.epochs}" if info.epochs else "",
                "eval accuracy": info.metrics.get("eval_accuracy"),
                "updated": time.strftime("%m-%d %H:%M", time.localtime(info.updated)) if info.updated else "",
            }
        )
    st.dataframe(
        rows,
        hide_index=True,
        width="stretch",
        column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            "eval accuracy": st.column_config.NumberColumn("eval accuracy", format="%.3f"),
        },
    )
    if alive != was_alive:  # a run started or ended: refresh the pickers, the run list and the refreshing itself
        st.rerun(scope="app")


def _live_view(run_id: str, was_active: bool) -> None:
    """Status, curves, stop button and log of one run; re-drawn every few seconds while it runs."""
    folder = catalog.runs_dir() / run_id
    info = run_folders.run_info(folder)
    status = _status(run_id, info)
    active = status in ACTIVE
    if was_active and not active:
        st.rerun(scope="app")  # the run ended: refresh the pickers (new checkpoint) and stop refreshing
    code = runs.exit_code(run_id)
    head_col, stop_col = st.columns([5, 1], vertical_alignment="center")
    with head_col:
        st.markdown(f"##### Run {widgets.plain(run_id)}: {widgets.plain(status)}")
        if info.total_steps:
            st.progress(info.fraction, text=f"step {info.step} of {info.total_steps}")
        if info.reason:
            st.caption(widgets.plain(info.reason))
    with stop_col:
        ours = runs.started_here(run_id) is not None
        if ours and active and st.button("Stop", key=f"train.stop.{run_id}", icon=":material/stop:", width="stretch"):
            runs.stop_run(run_id)
            st.session_state[keys.TRAIN_MESSAGE] = (
                "success",
                f"Asked run {run_id} to stop; it saves a resume state first.",
            )
            st.rerun(scope="app")
        if status in RESUMABLE and st.button(
            "Resume",
            key=f"train.resume.{run_id}",
            icon=":material/play_arrow:",
            width="stretch",
            help="Continue from the saved state: python -m training train --resume <run folder>.",
        ):
            try:
                runs.resume_run(catalog.runs_dir(), run_id)
            except (VitvizError, OSError) as exc:
                widgets.show_error(f"Not resumed: {exc}")
            else:
                st.session_state[keys.TRAIN_MESSAGE] = ("success", f"Resumed run {run_id}.")
                st.rerun(scope="app")
        if status == "finished":
            _compare_with_base(run_id)
    records = run_folders.read_metrics(folder)
    if records:
        smoothing = st.slider(
            "Smoothing",
            0.0,
            0.99,
            0.0,
            0.01,
            key="train.smoothing",
            help="Exponential moving average of each curve (as TensorBoard's): 0 draws the raw values; above 0 "
            "the raw values stay as a faint line.",
        )
        widgets.plotly(
            interactive.training_curves_figure(records, x="step", smoothing=smoothing), key=f"train.curves.{run_id}"
        )
        accuracy = info.metrics.get("eval_accuracy")
        if isinstance(accuracy, (int, float)):
            st.caption(
                f"Eval accuracy {100 * accuracy:.1f} %; checkpoints of finished epochs are in every model picker."
            )
    else:
        st.caption("Waiting for the first logged step…")
    _epoch_checkpoints(folder)
    log = runs.log_tail(catalog.runs_dir(), run_id)
    if log:
        with st.expander("Log", expanded=code not in (None, 0)):
            st.code(log, language=None)
    if records:
        widgets.downloads(
            run_id,
            figures={
                "training-curves": lambda: exports.paper_figures().training_curves_figure(
                    records, x="step", title=f"Run {run_id}"
                )
            },
            numbers={"metrics.csv": lambda: exports.records_csv_bytes(records)},
            key="train",
        )


COMPARE_PAGE = "vitviz/ui/compare.py"
CHANGED_TAB = "What changed"  # the /compare tab that measures what a fine-tune changed


def _compare_with_base(run_id: str) -> None:
    """For a finished fine-tune: open /compare on its base (the reference) and the run, at "What changed"."""
    entries = widgets.picker_entries()
    entry = next((e for e in entries if e.key == f"{catalog.RUN}:{run_id}"), None)
    base = None if entry is None else catalog.base_entry(entry, entries)
    if base is None or not st.button(
        "Compare with its base",
        key=f"train.compare.{run_id}",
        icon=":material/compare:",
        width="stretch",
        help=f"Open /compare with {base.label} and this run.",
    ):
        return
    if base.key not in {e.key for e in entries}:
        st.session_state.setdefault(keys.EXTRA_MODELS, {})[base.key] = base
    chosen = [base.key, entry.key]
    st.session_state[keys.COMPARE] = chosen
    st.session_state[keys.COMPARE_WIDGET] = chosen
    st.session_state[keys.COMPARE_ADOPTED] = True  # the URL's old ?compare= does not replace this choice
    st.session_state[keys.COMPARE_TAB] = CHANGED_TAB
    st.switch_page(COMPARE_PAGE)


def _epoch_checkpoints(folder: Path) -> None:
    """The run's epoch checkpoints, each one click from the model picker (the picker lists only the run's best)."""
    entries = catalog.run_epoch_entries(folder)
    if not entries:
        return
    with st.expander(f"Epoch checkpoints ({len(entries)})"):
        st.caption("The model picker offers the run's main checkpoint; open an epoch's checkpoint from here.")
        with st.container(horizontal=True, wrap=True, gap="small"):
            for entry in entries:
                st.button(
                    entry.path.stem if entry.path is not None else entry.key,
                    key=f"train.epoch.{entry.key}",
                    on_click=widgets.select_model,
                    args=(entry,),
                    width="content",
                )


if __name__ == "__main__":
    render()
