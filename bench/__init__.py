"""vitviz benchmarks: speed and memory targets, each measured against a baseline in the same run.

`python -m bench [--quick | --tiny] [--only capture,memory,...] [--json OUT]` measures the figures of
docs/benchmarks.md and writes

    {"machine": {...}, "figures": [{"name", "value", "target", "better", "unit", "baseline", "met", "detail"}]}

where `name` starts with the figure's family (capture, memory, distance, train, app), `better` is "lower"
or "higher", `target` is null for figures reported without a target, and `detail` holds the absolute
numbers behind the ratio. One module per family; `bench.common` holds the shared timing and records.
"""
