"""The deletion and insertion AUCs of a comparison of two models (`vitviz.comparison.ModelAUCs`): the "faithfulness"
section where a method does not apply to one model, the studio's disk cache round trip, and the AUC-interval figure
drawn alike by both renderers. The numbers themselves are held to `python -m vitviz faithfulness` in
tests/test_compare_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest

from vitviz.comparison import Comparison, ModelAUCs, ModelSummary
from vitviz.plots import figures, interactive, paper
from vitviz.ui.diskcache import DiskCache

N = 5
RNG = np.random.default_rng(2)


def _aucs(shift: float, not_applicable: dict[str, str] | None = None) -> ModelAUCs:
    reasons = not_applicable or {}
    applies = [m for m in ("rollout", "attention-last", "random") if m not in reasons]
    return ModelAUCs(
        methods=("rollout", "attention-last", "random"),
        steps=8,
        deletion={m: RNG.uniform(0.1, 0.3, N) + shift for m in applies},
        insertion={m: RNG.uniform(0.5, 0.7, N) - shift for m in applies},
        not_applicable=reasons,
    )


def _comparison(a: ModelAUCs | None, b: ModelAUCs | None) -> Comparison:
    def summary(source: str, aucs: ModelAUCs | None) -> ModelSummary:
        predicted = np.arange(N, dtype=np.int64) % 2
        grid = np.ones((2, 2))
        return ModelSummary(source, ("x", "y"), predicted, grid, grid, "not asked", aucs)

    return Comparison(
        a=summary("a.safetensors", a),
        b=summary("b.safetensors", b),
        labels=np.full(N, -1, dtype=np.int64),
        image_names=tuple(f"{i}.png" for i in range(N)),
        dataset_classes=None,
        distance_mode="paper",
    )


def test_a_method_that_does_not_apply_to_one_model_is_listed_not_compared() -> None:
    comparison = _comparison(_aucs(0.0), _aucs(0.2, {"attention-last": "no attention to read"}))
    section = comparison.to_json()["faithfulness"]
    assert section["methods"] == ["rollout", "attention-last", "random"] and section["num_images"] == N
    assert section["b"]["methods"]["attention-last"] == {"not_applicable": "no attention to read"}
    assert set(section["a"]["methods"]["attention-last"]) == {
        "deletion_auc",
        "insertion_auc",
        "deletion_auc_interval",
        "insertion_auc_interval",
        "num_images",
    }
    assert section["b"]["comparisons"]["num_images"] == N  # B's own comparisons, of the methods that apply
    assert section["difference"]["attention-last"] == {"not_applicable": "model B: no attention to read"}
    assert "attention-last: not compared (model B: no attention to read)." in section["verdict"]
    rollout = section["difference"]["rollout"]["deletion"]
    assert rollout["better"] == "A"  # B's deletion AUCs are all 0.2 above A's range: a clear gap
    assert rollout["verdict"].startswith("deletion: A has the lower AUC (B − A +")
    a = comparison.a.aucs
    assert a is not None
    assert section["a"]["methods"]["rollout"]["deletion_auc"] == sum(a.deletion["rollout"].tolist()) / N
    assert comparison.auc_points()["B"]["deletion"].keys() == {"rollout", "random"}
    assert "faithfulness" not in _comparison(None, None).to_json()  # none asked


def test_the_aucs_round_trip_through_the_disk_cache(tmp_path: Path) -> None:
    original = _comparison(_aucs(0.0), _aucs(0.1, {"rollout": "why not"}))
    cache = DiskCache(tmp_path)
    cache.put("comparison", "k" * 64, original.to_arrays())
    stored = cache.get("comparison", "k" * 64)
    assert stored is not None
    restored = Comparison.from_arrays(stored)
    assert json.dumps(restored.to_json()) == json.dumps(original.to_json())
    for side in ("a", "b"):
        before, after = getattr(original, side).aucs, getattr(restored, side).aucs
        assert after.methods == before.methods and after.steps == before.steps
        assert after.not_applicable == before.not_applicable
        for method, values in before.deletion.items():
            np.testing.assert_array_equal(after.deletion[method], values)
            np.testing.assert_array_equal(after.insertion[method], before.insertion[method])
    none = _comparison(None, None)
    assert Comparison.from_arrays(none.to_arrays()).a.aucs is None


def test_auc_intervals_are_drawn_alike_by_both_renderers() -> None:
    points = _comparison(_aucs(0.0), _aucs(0.1, {"random": "why not"})).auc_points()
    description = figures.describe_auc_intervals(points, title="AUCs")
    assert description.categories == ("rollout", "attention-last", "random")
    drawn, shown = paper.render_matplotlib(description), interactive.render_plotly(description)
    assert drawn._suptitle.get_text() == shown.layout.title.text == "AUCs"
    assert [ax.get_title() for ax in drawn.axes] == [note.text for note in shown.layout.annotations]
    assert [ax.get_title() for ax in drawn.axes] == [
        "Deletion (lower AUC is better)",
        "Insertion (higher AUC is better)",
    ]
    assert [t.get_text() for t in drawn.axes[0].get_xticklabels()] == list(shown.layout.xaxis.ticktext)
    assert [trace.name for trace in shown.data] == ["A", "B", "A", "B"]
    assert [trace.showlegend for trace in shown.data] == [True, True, False, False]
    for ax, traces in zip(drawn.axes, (shown.data[:2], shown.data[2:])):
        assert [text.get_text() for text in ax.get_legend().get_texts()] == [t.name for t in traces]
        for container, trace in zip(ax.containers, traces):
            line = container.lines[0]
            np.testing.assert_allclose(line.get_xdata(), trace.x)
            np.testing.assert_allclose(line.get_ydata(), np.asarray(trace.y, dtype=float))
            assert matplotlib.colors.to_hex(line.get_color()) == trace.marker.color
    deletion = shown.data[0]
    auc, low, high = points["A"]["deletion"]["rollout"]
    assert (deletion.y[0], deletion.error_y.arrayminus[0], deletion.error_y.array[0]) == pytest.approx(
        (auc, auc - low, high - auc)
    )
    assert np.isnan(shown.data[1].y[2])  # B has no random: a gap, not a point
    with pytest.raises(ValueError, match="no AUCs"):
        figures.describe_auc_intervals({"A": {}, "B": {}})
