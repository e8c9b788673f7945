"""Shared pieces of the reliability suite: generators of hostile inputs, a fork server, and the tally of figures.

Every input is generated here from a fixed seed; nothing is downloaded. The generators return bytes plus
what a user should get from them (an error naming the file, or the exact pixels a viewer would show), so
each test module can push the same cases through the Python API, the command line and the app.
"""

from __future__ import annotations

import builtins
import collections
import importlib
import io
import json
import marshal
import os
import pickle
import select
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

MEMORY_LIMIT = 1 << 30
"""Address space a hostile model or image load may add (RLIMIT_AS, on top of the ~3.6 GiB that importing
torch, timm and vitviz maps). Loading the tiny test checkpoint grows it by well under 100 MiB."""

APP_MEMORY_LIMIT = 2 << 30
"""The same bound for a whole AppTest session (the app's pages, plotly and matplotlib come on top)."""

TIMM_ARCH = "vit_tiny_patch16_224"  # the timm model that hostile --weights files are offered to

# --- the tally: figures for docs/reliability.md ------------------------------------------------------

TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the figures docs/reliability.md quotes (only the categories that ran)."""
    if not TALLY:
        return
    terminalreporter.section("reliability figures")
    for category in sorted(TALLY):
        counts = ", ".join(f"{key} {value}" for key, value in sorted(TALLY[category].items()))
        terminalreporter.write_line(f"{category}: {counts}")


@pytest.fixture(scope="session")
def tally() -> dict[str, collections.Counter]:
    return TALLY


# --- the fork server -----------------------------------------------------------------------------------


@dataclass
class ChildResult:
    """How one job in a forked child ended."""

    exit_code: int | None  # 0: the job returned; 99: it raised (see stderr); None: killed by a signal
    signal: int | None
    result: Any  # what the job returned (JSON), or None
    stdout: str
    stderr: str
    rss_growth: int | None  # peak resident set minus the resident set at the start, in bytes
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.result is not None


class Sandbox:
    """Client of `_sandbox.py`: runs `_jobs.<name>(**kwargs)` in a fresh fork, one at a time."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MiB of address space per arena; keep RLIMIT_AS meaningful
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability._sandbox"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        hello = self._read(timeout=300)
        assert hello.get("ready"), hello

    def _read(self, timeout: float) -> dict:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the fork server stopped answering; see {self.workdir / 'server.log'}")
        return json.loads(line)

    def start(
        self,
        job: str,
        *,
        memory_limit: int | None = None,
        timeout: int = 120,
        kill_after: float | None = None,
        **kwargs: Any,
    ) -> tuple[int, Path]:
        """Fork a child for `job`; returns its pid and output folder. Call `finish` next."""
        self.count += 1
        out = self.workdir / f"job-{self.count:05d}"
        out.mkdir()
        request = {
            "job": job,
            "kwargs": kwargs,
            "out": str(out),
            "memory_limit": memory_limit,
            "timeout": timeout,
            "kill_after": kill_after,
        }
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read(timeout=60)["pid"], out

    def finish(self, out: Path, timeout: float = 300) -> ChildResult:
        answer = self._read(timeout=timeout)
        result_file, memory_file = out / "result.json", out / "memory.json"
        memory = json.loads(memory_file.read_text()) if memory_file.exists() else None
        return ChildResult(
            exit_code=answer["exit_code"],
            signal=answer["signal"],
            result=json.loads(result_file.read_text()) if result_file.exists() else None,
            stdout=(out / "stdout").read_text(errors="replace"),
            stderr=(out / "stderr").read_text(errors="replace"),
            rss_growth=None if memory is None else memory["rss_peak"] - memory["rss_start"],
            seconds=answer["seconds"],
        )

    def run(self, job: str, **kwargs: Any) -> ChildResult:
        """Run `job` in a child and wait for it."""
        _, out = self.start(job, **kwargs)
        return self.finish(out, timeout=(kwargs.get("timeout") or 120) + 60)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    server = Sandbox(tmp_path_factory.mktemp("sandbox"))
    yield server
    server.close()


def one_line_cli_error(result: dict, prefix: str = "vitviz: error: ") -> str:
    """The single stderr line of a refused CLI call; fails when it is anything else."""
    lines = result["stderr"].strip().splitlines()
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


# --- a tiny project checkpoint ---------------------------------------------------------------------------

TINY_CONFIG = {"img_size": [32, 32], "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3}
CLASS_NAMES = ["circle", "square", "triangle"]


def tiny_checkpoint_parts(seed: int = 0, **config_changes: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the meta document of a small, valid project checkpoint."""
    from vitviz.models import ModelMeta, ViTConfig, build_model

    config = ViTConfig.from_dict({**TINY_CONFIG, **config_changes})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config)
    meta = ModelMeta(
        arch="vitviz",
        config=config,
        class_names=CLASS_NAMES[: config.num_classes] + [f"c{i}" for i in range(3, config.num_classes)],
        input_size=config.img_size,
        in_chans=config.in_chans,
        mean=(0.5,) * config.in_chans,
        std=(0.25,) * config.in_chans,
        training={"run_id": "reliability", "dataset": "none"},
        resolution_history=[],
    )
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return tensors, json.loads(meta.to_json())


def safetensors_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | str | None) -> bytes:
    metadata = None if meta is None else {"vitviz": meta if isinstance(meta, str) else json.dumps(meta)}
    return safetensors.torch.save(tensors, metadata=metadata)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    path.write_bytes(safetensors_bytes(*tiny_checkpoint_parts()))
    return path


# --- hostile checkpoints ----------------------------------------------------------------------------------


class _Call:
    """Unpickling this object calls f(*args). f and the args may be _Calls themselves, which pickle evaluates
    first (nested REDUCE opcodes): that is how real exploits chain getattr and imports."""

    def __init__(self, f: Any, *args: Any) -> None:
        self.f, self.args = f, args

    def __call__(self, *args: Any) -> None:  # pickle insists that the reduce function be callable
        raise AssertionError("only for pickling")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.f, self.args


PAYLOADS = ("os-system", "eval", "exec", "importlib", "marshal", "nested-getattr", "subprocess", "open")


def code_payload(kind: str, marker: Path) -> _Call:
    """A pickled object whose loading would create `marker`, by one of the routes real exploits take."""
    m = str(marker)
    if kind == "os-system":
        return _Call(os.system, f"touch '{m}'")
    if kind == "eval":
        return _Call(builtins.eval, f"open({m!r}, 'w').close()")
    if kind == "exec":
        return _Call(builtins.exec, f"import pathlib; pathlib.Path({m!r}).touch()")
    if kind == "importlib":
        return _Call(_Call(getattr, _Call(importlib.import_module, "os"), "system"), f"touch '{m}'")
    if kind == "marshal":
        code = marshal.dumps(compile(f"open({m!r}, 'w').close()", "<payload>", "exec"))
        return _Call(builtins.exec, _Call(marshal.loads, code))
    if kind == "nested-getattr":  # getattr(getattr(__import__("pathlib"), "Path")(m), "touch")()
        path_class = _Call(getattr, _Call(builtins.__import__, "pathlib"), "Path")
        return _Call(_Call(getattr, _Call(path_class, m), "touch"))
    if kind == "subprocess":
        return _Call(subprocess.call, ["touch", m])
    if kind == "open":
        return _Call(builtins.open, m, "w")
    raise ValueError(kind)


def pickled_payload(kind: str, marker: Path, container: str) -> bytes:
    """The payload as a plain pickle ("plain") or inside a torch.save zip archive, nested like a state dict ("zip")."""
    if container == "plain":
        return pickle.dumps(code_payload(kind, marker), protocol=2)
    return torch_archive(pickle.dumps({"model": {"head.weight": code_payload(kind, marker)}}, protocol=2))


def torch_archive(data_pkl: bytes) -> bytes:
    """A torch.save zip archive (all of its records real) whose data.pkl is replaced by `data_pkl`."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else source.read(info))
    return out.getvalue()


class _HugeStorage:
    """Stands for a storage in a hand-made torch pickle."""


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _HugeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", 10**12)  # claims 4 TB; data/0 holds 8 bytes
        return None


def huge_storage_pickle() -> bytes:
    buffer = io.BytesIO()
    tensor = _Call(
        torch._utils._rebuild_tensor_v2, _HugeStorage(), 0, (10**12,), (1,), False, collections.OrderedDict()
    )
    _StoragePickler(buffer, protocol=2).dump({"w": tensor})
    return buffer.getvalue()


def raw_safetensors(header: dict | bytes, data: bytes = b"", declared_length: int | None = None) -> bytes:
    """A .safetensors file byte by byte: 8-byte little-endian header length, JSON header, tensor data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared_length is None else declared_length) + text + data


@dataclass(frozen=True)
class HostileFile:
    """A checkpoint or weights file that must be refused."""

    name: str  # test id
    filename: str  # what it is called on disk and in the upload
    data: bytes
    marker: Path | None = None  # the file its loading would create, for code-running payloads

    @property
    def is_torch_file(self) -> bool:
        return not self.filename.endswith(".safetensors")


def hostile_checkpoints(marker_dir: Path) -> list[HostileFile]:
    """At least 25 broken or hostile checkpoints; every one must be refused with one clear error."""
    files: list[HostileFile] = []
    for container, prefix, suffix in (("plain", "pickle", ".pth"), ("zip", "torchzip", ".bin")):
        for kind in PAYLOADS:
            marker = marker_dir / f"{prefix}-{kind}.marker"
            data = pickled_payload(kind, marker, container)
            files.append(HostileFile(f"{prefix}-{kind}", f"{prefix}-{kind}{suffix}", data, marker))
    for container, kind in (("plain", "os-system"), ("zip", "exec")):
        marker = marker_dir / f"{container}-as-safetensors.marker"
        data = pickled_payload(kind, marker, container)
        files.append(HostileFile(f"{container}-pickle-as-safetensors", f"{container}.safetensors", data, marker))
    files.append(HostileFile("torchzip-huge-storage", "huge-storage.pt", torch_archive(huge_storage_pickle())))

    rng = np.random.default_rng(6)
    tensors, meta = tiny_checkpoint_parts()
    good = safetensors_bytes(tensors, meta)
    files += [
        HostileFile("zero-bytes", "empty.safetensors", b""),
        HostileFile("zero-bytes-pth", "empty.pth", b""),
        HostileFile("truncated-half", "half.safetensors", good[: len(good) // 2]),
        HostileFile("truncated-header", "cut-header.safetensors", good[:100]),
        HostileFile("truncated-pth", "cut.pth", torch_archive(pickle.dumps({"w": 1}, 2))[:300]),
        HostileFile("random-bytes", "random.safetensors", rng.bytes(8192)),
        HostileFile("random-bytes-pth", "random.pth", rng.bytes(8192)),
    ]

    f32 = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes of tensor data
    lying_headers = {
        "header-length-2^40": raw_safetensors(b"{}", f32, declared_length=1 << 40),
        "header-length-past-end": raw_safetensors(b'{"w": {"dtype": "F32"', f32, declared_length=4096),
        "header-not-json": raw_safetensors(b"this is not JSON at all", f32),
        "offsets-past-end": raw_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 30]}}, f32),
        "shape-lies": raw_safetensors({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 16]}}, f32),
        "overlapping-tensors": raw_safetensors(
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            f32,
        ),
        "unknown-dtype": raw_safetensors({"w": {"dtype": "OBJECT", "shape": [4], "data_offsets": [0, 16]}}, f32),
        "shape-overflow": raw_safetensors(
            {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, f32
        ),
        "metadata-not-string": raw_safetensors(
            {
                "__metadata__": {"vitviz": {"config": None}},
                "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            },
            f32,
        ),
    }
    files += [HostileFile(f"lying-{name}", f"{name}.safetensors", data) for name, data in lying_headers.items()]

    deeper, _ = tiny_checkpoint_parts(depth=3)
    wider, _ = tiny_checkpoint_parts(embed_dim=64)
    missing = {k: v for k, v in tensors.items() if k != "head.weight"}
    extra = {**tensors, "backdoor.weight": torch.zeros(3)}
    nan = {**tensors, "blocks.0.attn.qkv.weight": torch.full_like(tensors["blocks.0.attn.qkv.weight"], float("nan"))}
    files += [
        HostileFile("shapes-deeper-than-config", "deeper.safetensors", safetensors_bytes(deeper, meta)),
        HostileFile("shapes-wider-than-config", "wider.safetensors", safetensors_bytes(wider, meta)),
        HostileFile("shapes-missing-key", "missing.safetensors", safetensors_bytes(missing, meta)),
        HostileFile("shapes-unexpected-key", "extra.safetensors", safetensors_bytes(extra, meta)),
        HostileFile("weights-nan", "nan.safetensors", safetensors_bytes(nan, meta)),
        HostileFile("no-vitviz-metadata", "bare.safetensors", safetensors_bytes(tensors, None)),
    ]

    def edited(**changes: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(meta))
        config_changes = changes.pop("config_changes", {})
        doc.update(changes)
        if config_changes:
            doc["config"].update(config_changes)
        return doc

    no_config = edited()
    del no_config["config"]
    metas: dict[str, dict[str, Any] | str] = {
        "malformed-json": '{"arch": "vitviz", "config": {',
        "json-not-object": "[1, 2, 3]",
        "deeply-nested": "[" * 100_000 + "]" * 100_000,
        "missing-keys": no_config,
        "unknown-keys": edited(payload="__import__('os')"),
        "depth-10^6": edited(config_changes={"depth": 10**6}),
        "width-0": edited(config_changes={"embed_dim": 0}),
        "negative-patch": edited(config_changes={"patch_size": -8}),
        "img-size-10^9": edited(input_size=[10**9, 10**9], config_changes={"img_size": [10**9, 10**9]}),
        "classes-10^9": edited(class_names=["x"] * 3, config_changes={"num_classes": 10**9}),
        "nan-mean": edited(mean=[float("nan")] * 3),
        "format-from-the-future": edited(format_version=999),
        "string-numbers": edited(config_changes={"depth": "2"}),
        # In range on every field, but 3.2e9 parameters (12.9 GB) for a file of a few kilobytes.
        "huge-but-valid-config": edited(config_changes={"embed_dim": 8192, "num_heads": 8, "depth": 4}),
        # A timm architecture of 1.8e9 parameters (7.5 GB) claimed by a file of a few kilobytes.
        "huge-timm-arch": edited(
            arch="vit_gigantic_patch14_224",
            config=None,
            input_size=[224, 224],
            class_names=[f"c{i}" for i in range(1000)],
        ),
    }
    files += [
        HostileFile(f"meta-{name}", f"meta-{name}.safetensors", safetensors_bytes(tensors, doc))
        for name, doc in metas.items()
    ]
    return files


# --- hostile Hugging Face folders ---------------------------------------------------------------------------

HF_PROCESSOR = {"do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
                "size": {"height": 32, "width": 32}}  # fmt: skip


@dataclass(frozen=True)
class HostileFolder:
    """A `hf:` model folder that must be refused: its files (name -> bytes; None removes one) over a good folder."""

    name: str  # test id, also the Hub id "hostile/<name>" the app is given for it
    changes: dict[str, bytes | None]
    fragment: str  # what the refusal must say
    marker: Path | None = None


def tiny_hf_files(hidden_size: int = 32) -> dict[str, bytes]:
    """The files of a tiny, valid ViTForImageClassification saved by `save_pretrained` (3 classes, 32 px)."""
    import tempfile

    import transformers

    config = transformers.ViTConfig(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8,
                                    id2label={i: name for i, name in enumerate(CLASS_NAMES)},
                                    label2id={name: i for i, name in enumerate(CLASS_NAMES)})  # fmt: skip
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.ViTForImageClassification(config).save_pretrained(folder)
        files = {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}
    files["preprocessor_config.json"] = json.dumps(HF_PROCESSOR).encode()
    return files


def write_hf_folder(folder: Path, files: dict[str, bytes | None]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    return folder


def hostile_hf_folders(marker_dir: Path) -> list[HostileFolder]:
    """Model folders whose config, preprocessor config or weights are broken, absurd or hostile."""
    good = tiny_hf_files()
    config = json.loads(good["config.json"])

    def config_with(**changes: Any) -> bytes:
        return json.dumps({**config, **changes}).encode()

    def processor_with(**changes: Any) -> bytes:
        return json.dumps({**HF_PROCESSOR, **changes}).encode()

    latin1 = json.dumps({**config, "id2label": {"0": "pomme \u00e9", "1": "b", "2": "c"}}, ensure_ascii=False)
    many_labels = {**config, "id2label": {str(i): "a" for i in range(10**6)}}
    del many_labels["label2id"]
    bert = transformers_config("BertConfig", architectures=["ViTModel"])
    marker_zip, marker_plain = marker_dir / "hf-torchzip.marker", marker_dir / "hf-pickle.marker"
    no_safetensors = {"model.safetensors": None}
    folders = [
        HostileFolder("config-not-json", {"config.json": b'{"architectures": ["ViTForImageClassification"'}, "not valid JSON"),
        HostileFolder("config-json-list", {"config.json": b"[1, 2, 3]"}, "not an object"),
        HostileFolder("config-nested-200k", {"config.json": b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"}, "nests deeper"),
        HostileFolder("config-architectures-5", {"config.json": config_with(architectures=5)}, "architectures must be a list"),
        HostileFolder("config-not-utf8", {"config.json": latin1.encode("latin-1")}, "not UTF-8"),
        HostileFolder("processor-not-json", {"preprocessor_config.json": b"image_mean = 0.5"}, "not valid JSON"),
        HostileFolder("processor-json-list", {"preprocessor_config.json": b"[0.5, 0.25]"}, "not an object"),
        HostileFolder("processor-std-strings", {"preprocessor_config.json": processor_with(image_std=["a", "b", "c"])}, "image_std"),
        HostileFolder("weights-another-size", {"model.safetensors": tiny_hf_files(hidden_size=64)["model.safetensors"]}, "wrong shape"),
        HostileFolder("image-size-0", {"config.json": config_with(image_size=0)}, "image_size"),
        HostileFolder("image-smaller-than-patch", {"config.json": config_with(image_size=4)}, "smaller than one"),
        HostileFolder("hidden-1e9", {"config.json": config_with(hidden_size=10**9)}, "hidden_size"),
        HostileFolder("bert-config-claims-vit", {"config.json": json.dumps(bert).encode()}, "'bert'"),
        HostileFolder("id2label-1e6", {"config.json": json.dumps(many_labels).encode()}, "id2label"),
        HostileFolder("weights-truncated", {"model.safetensors": good["model.safetensors"][: len(good["model.safetensors"]) // 2]}, "not a readable"),
        HostileFolder("weights-unrelated-tensor", {"model.safetensors": safetensors.torch.save({"foo": torch.zeros(3)})}, "missing"),
        # In range on every field, but 38.7e9 parameters (155 GB) for a file of a few hundred kilobytes.
        HostileFolder("hidden-8192-x-48-layers", {"config.json": config_with(hidden_size=8192, num_hidden_layers=48,
                      num_attention_heads=64, intermediate_size=32768)}, "do not cover"),
        HostileFolder("layers-1e6", {"config.json": config_with(num_hidden_layers=1_000_000)}, "num_hidden_layers"),
        HostileFolder("pytorch-bin-torchzip-reduce", {**no_safetensors, "pytorch_model.bin": pickled_payload("os-system", marker_zip, "zip")}, "refused to read", marker_zip),
        HostileFolder("pytorch-bin-pickle-reduce", {**no_safetensors, "pytorch_model.bin": pickled_payload("exec", marker_plain, "plain")}, "refused to read", marker_plain),
        HostileFolder("shard-index-leaves-folder", {**no_safetensors, "model.safetensors.index.json": json.dumps(
                      {"weight_map": {"classifier.weight": "../../outside.safetensors"}}).encode()}, "not a .safetensors file in"),
    ]  # fmt: skip
    return folders


def transformers_config(name: str, **changes: Any) -> dict[str, Any]:
    import transformers

    return {**getattr(transformers, name)().to_dict(), **changes}


# --- images -------------------------------------------------------------------------------------------------

ORIENTATION_TAG = 0x0112

# What a viewer does to the stored pixels for each EXIF orientation (TIFF 6.0 / EXIF 2.3, tag 0x0112):
# the tag says where the stored row 0 and column 0 are when the picture is shown upright.
UPRIGHT = {
    1: lambda a: a,  # row 0 top, column 0 left
    2: lambda a: a[:, ::-1],  # row 0 top, column 0 right: mirror left-right
    3: lambda a: a[::-1, ::-1],  # row 0 bottom, column 0 right: rotate 180
    4: lambda a: a[::-1, :],  # row 0 bottom, column 0 left: mirror top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # row 0 left, column 0 top: mirror along the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # row 0 right, column 0 top: rotate 90 clockwise
    7: lambda a: np.rot90(a, k=2).transpose(1, 0, 2),  # row 0 right, column 0 bottom: mirror along the anti-diagonal
    8: lambda a: np.rot90(a, k=1),  # row 0 left, column 0 bottom: rotate 90 counter-clockwise
}


@dataclass(frozen=True)
class ImageCase:
    """An image file and what a user must get from it."""

    name: str  # test id
    filename: str
    data: bytes
    expected: np.ndarray | None = None  # uint8 [H, W, 3] a viewer shows; None: the file must be refused
    tolerance: int = 0  # largest per-pixel difference allowed from `expected`
    fragment: str = ""  # what the refusal must say
    bomb: bool = False  # must be refused from its header, before decoding
    tags: tuple[str, ...] = field(default=())

    @property
    def valid(self) -> bool:
        return self.expected is not None


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blocks of distinct colours, 4x4 pixels each (so JPEG keeps them apart), asymmetric under any flip."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, ((height + 3) // 4, (width + 3) // 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)[:height, :width]


def stored_pixels(data: bytes) -> np.ndarray:
    """The pixels as stored in the file (no orientation applied), decoded by PIL directly: the reference."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _png_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _gif_with_size(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def _bmp_with_size(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + bytes(64)


def _jpeg_with_size(width: int, height: int) -> bytes:
    real = encode(Image.new("RGB", (8, 8), (9, 9, 9)), "JPEG", quality=90)
    at = real.index(b"\xff\xc0")  # SOF0: length, precision, height, width
    return real[: at + 5] + struct.pack(">HH", height, width) + real[at + 9 :]


def _tiff_with_size(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 4)]  # fmt: skip
    ifd = (
        struct.pack("<H", len(entries))
        + b"".join(
            struct.pack("<HHII", tag, kind, count, value)
            if kind == 4
            else struct.pack("<HHIHH", tag, kind, count, value, 0)
            for tag, kind, count, value in entries
        )
        + b"\x00\x00\x00\x00"
    )
    return b"II*\x00" + struct.pack("<I", 12) + b"\x00\x00\x00\x00" + ifd


def _webp_with_size(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)  # VP8L: 14 bits each, then alpha hint and version 0
    payload = b"\x2f" + struct.pack("<I", bits) + bytes(16)
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def bad_images() -> list[ImageCase]:
    """Files that are not pictures, are damaged, or would decode to too many pixels: all must be refused."""
    rng = np.random.default_rng(7)
    photo = encode(Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)), "JPEG", quality=90)
    png = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    gif = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).convert("P"), "GIF")
    text = b"These are my holiday notes, not a picture.\n" * 20
    svg = b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64" fill="red"/></svg>\n'
    pdf = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n(/tmp/x) (w) file closefile\nshowpage\n"
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + rng.bytes(256)
    ico = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "ICO")
    bad_crc = bytearray(png)
    idat = bad_crc.index(b"IDAT")
    bad_crc[idat + 10] ^= 0xFF  # damage the compressed pixels; the chunk's CRC no longer matches
    cases = [
        ImageCase("zero-bytes", "empty.png", b"", fragment="empty"),
        ImageCase("random-4k", "noise.png", rng.bytes(4096), fragment="not a PNG, JPEG"),
        ImageCase("random-64k", "noise.jpg", rng.bytes(65536), fragment="not a PNG, JPEG"),
        ImageCase("png-magic-then-noise", "magic.png", png[:16] + rng.bytes(2048)),
        ImageCase("text-as-png", "notes.png", text, fragment="not a PNG, JPEG"),
        ImageCase("text-as-jpg", "notes.jpg", text, fragment="not a PNG, JPEG"),
        ImageCase("html-as-png", "page.png", b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"),
        ImageCase("jpeg-cut-10", "cut10.jpg", photo[: len(photo) // 10]),
        ImageCase("jpeg-cut-50", "cut50.jpg", photo[: len(photo) // 2], fragment="damaged or truncated"),
        ImageCase("jpeg-cut-90", "cut90.jpg", photo[: len(photo) * 9 // 10], fragment="damaged or truncated"),
        ImageCase("png-cut-50", "cut50.png", png[: len(png) // 2], fragment="damaged or truncated"),
        ImageCase("gif-cut-50", "cut50.gif", gif[: len(gif) // 2]),
        ImageCase("png-bad-crc", "crc.png", bytes(bad_crc)),
        ImageCase("svg-as-png", "logo.png", svg, fragment="SVG"),
        ImageCase("svg-as-jpg", "logo.jpg", svg, fragment="SVG"),
        ImageCase("pdf-as-jpg", "scan.jpg", pdf, fragment="PDF"),
        ImageCase("pdf-as-png", "scan.png", pdf, fragment="PDF"),
        ImageCase("eps-as-png", "figure.png", eps, fragment="not a PNG, JPEG"),
        ImageCase("heic-as-jpg", "iphone.jpg", heic, fragment="HEIC"),
        ImageCase("ico-as-png", "favicon.png", ico, fragment="not a PNG, JPEG"),
        ImageCase("gif-zero-size", "zero.gif", _gif_with_size(0, 0)),
    ]
    bombs = {
        "bomb-png-100k": ("bomb.png", _png_with_size(100_000, 100_000)),
        "bomb-png-just-over": ("big.png", _png_with_size(8_000, 5_001)),
        "bomb-gif-64k": ("bomb.gif", _gif_with_size(65_535, 65_535)),
        "bomb-bmp-50k": ("bomb.bmp", _bmp_with_size(50_000, 50_000)),
        "bomb-jpeg-65k": ("bomb.jpg", _jpeg_with_size(65_500, 65_500)),
        "bomb-tiff-100k": ("bomb.tif", _tiff_with_size(100_000, 100_000)),
        "bomb-webp-16k": ("bomb.webp", _webp_with_size(16_384, 16_384)),
    }
    cases += [
        ImageCase(name, filename, data, fragment="pixel limit", bomb=True) for name, (filename, data) in bombs.items()
    ]
    return cases


def odd_images() -> list[ImageCase]:
    """Unusual but valid pictures, each with the exact pixels (or a stated tolerance) a viewer must show."""
    cases: list[ImageCase] = []
    base = pattern(24, 40)
    exif_jpeg = encode(Image.fromarray(base), "JPEG", quality=95)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        data = encode(Image.fromarray(base), "JPEG", quality=95, exif=exif.tobytes())
        cases.append(
            ImageCase(
                f"exif-{orientation}", f"phone-{orientation}.jpg", data, UPRIGHT[orientation](stored_pixels(data))
            )
        )
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 9  # not a valid orientation: shown as stored
    data = encode(Image.fromarray(base), "JPEG", quality=95, exif=exif.tobytes())
    cases.append(ImageCase("exif-invalid-9", "odd-exif.jpg", data, stored_pixels(data)))
    garbage_exif = exif_jpeg[:2] + b"\xff\xe1\x00\x10Exif\x00\x00II*\x00\xff\xff\xff\xff" + exif_jpeg[2:]
    cases.append(ImageCase("exif-garbage", "broken-exif.jpg", garbage_exif, stored_pixels(exif_jpeg)))

    cmyk = np.array(
        [[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255], [0, 255, 255, 0]]], np.uint8
    )
    cmyk = np.repeat(np.repeat(cmyk, 8, axis=0), 8, axis=1)  # 8 x 48
    cmyk_rgb = np.repeat(np.repeat(np.array(
        [[[255, 255, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0], [255, 0, 0]]], np.uint8
    ), 8, axis=0), 8, axis=1)  # fmt: skip  # C, M, Y, K remove R, G, B, all
    cmyk_image = Image.fromarray(cmyk, mode="CMYK")
    cases.append(ImageCase("cmyk-tiff", "print.tif", encode(cmyk_image, "TIFF"), cmyk_rgb))
    cases.append(ImageCase("cmyk-jpeg", "print.jpg", encode(cmyk_image, "JPEG", quality=100), cmyk_rgb, tolerance=8))

    grey16 = (np.arange(16 * 24, dtype=np.uint32).reshape(16, 24) * 171 % 65536).astype(np.uint16)
    grey16[0, :4] = (0, 257, 32896, 65535)
    scaled = np.floor(grey16 / 257.0 + 0.5).astype(np.uint8)  # 65535 is white, not 255; no ties (257 is odd)
    for fmt, suffix in (("PNG", "png"), ("TIFF", "tif")):
        cases.append(
            ImageCase(
                f"grey16-{suffix}",
                f"scan16.{suffix}",
                encode(Image.fromarray(grey16), fmt),
                np.repeat(scaled[..., None], 3, axis=2),
            )
        )
    ramp = np.linspace(0.0, 1.0, 8 * 10, dtype=np.float32).reshape(8, 10)
    cases.append(ImageCase("float-grey-tiff", "depth.tif", encode(Image.fromarray(ramp, mode="F"), "TIFF"),
                           np.repeat(np.rint(ramp * 255).astype(np.uint8)[..., None], 3, axis=2), tolerance=1))  # fmt: skip

    grey = np.array([128, 128, 128], dtype=np.float64)
    rgba = pattern(12, 16, seed=1)
    alpha = np.tile(np.array([0, 255, 128, 64], np.uint8), (12, 4))
    over_grey = rgba * (alpha[..., None] / 255.0) + grey * (1 - alpha[..., None] / 255.0)
    cases.append(ImageCase("rgba", "sticker.png", encode(Image.fromarray(np.dstack([rgba, alpha])), "PNG"),
                           np.rint(over_grey).astype(np.uint8), tolerance=1))  # fmt: skip
    luma = pattern(12, 16, seed=2)[..., 0]
    la_over = luma * (alpha / 255.0) + 128 * (1 - alpha / 255.0)
    la_image = Image.merge("LA", (Image.fromarray(luma), Image.fromarray(alpha)))
    cases.append(
        ImageCase(
            "la",
            "mask.png",
            encode(la_image, "PNG"),
            np.repeat(np.rint(la_over).astype(np.uint8)[..., None], 3, axis=2),
            tolerance=1,
        )
    )

    palette = Image.new("P", (8, 4))
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0)]
    palette.putpalette([c for colour in colours for c in colour] + [0] * (256 - 3) * 3)
    indices = np.array([[0, 1, 2, 1, 0, 2, 2, 1]] * 4, np.uint8)
    palette.putdata(indices.ravel().tolist())
    opaque = np.array(colours, np.uint8)[indices]
    with_hole = opaque.copy()
    with_hole[indices == 0] = 128
    cases.append(ImageCase("palette-transparent", "icon.png", encode(palette, "PNG", transparency=0), with_hole))
    cases.append(ImageCase("palette-transparent-gif", "icon.gif", encode(palette, "GIF", transparency=0), with_hole))
    cases.append(ImageCase("palette-opaque", "flat.png", encode(palette, "PNG"), opaque))

    bits = (pattern(10, 12, seed=3)[..., 0] > 127).astype(np.uint8) * 255
    cases.append(
        ImageCase(
            "one-bit",
            "fax.png",
            encode(Image.fromarray(bits).convert("1"), "PNG"),
            np.repeat(bits[..., None], 3, axis=2),
        )
    )
    cases.append(
        ImageCase(
            "one-bit-bmp",
            "fax.bmp",
            encode(Image.fromarray(bits).convert("1"), "BMP"),
            np.repeat(bits[..., None], 3, axis=2),
        )
    )

    frames = [Image.new("RGB", (10, 6), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    first = np.asarray(frames[0])
    for fmt, suffix, extra in (("GIF", "gif", {}), ("WEBP", "webp", {"lossless": True}), ("PNG", "png", {})):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
        cases.append(ImageCase(f"animated-{suffix}", f"animated.{suffix}", data, first))
    pages = [Image.fromarray(pattern(8, 8, seed=s)) for s in (4, 5)]
    cases.append(
        ImageCase(
            "multipage-tiff",
            "pages.tif",
            encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
            np.asarray(pages[0]),
        )
    )

    for size in ((1, 1), (1, 65535), (65535, 1)):
        pixels = np.full((size[1], size[0], 3), (255, 128, 0), np.uint8)
        pixels[0, 0] = (0, 0, 255)
        cases.append(
            ImageCase(
                f"size-{size[0]}x{size[1]}",
                f"line-{size[0]}x{size[1]}.png",
                encode(Image.fromarray(pixels), "PNG"),
                pixels,
            )
        )

    photo = pattern(32, 48, seed=8)
    progressive = encode(Image.fromarray(photo), "JPEG", quality=90, progressive=True)
    grey_jpeg = encode(Image.fromarray(photo[..., 1]), "JPEG", quality=90)
    lossy_webp = encode(Image.fromarray(photo), "WEBP", quality=80)
    jpeg_named_png = encode(Image.fromarray(photo), "JPEG", quality=85)
    for name, filename, data in (
        ("jpeg-progressive", "progressive.jpg", progressive),
        ("jpeg-grey", "grey.jpg", grey_jpeg),
        ("webp-lossy", "photo.webp", lossy_webp),
        ("jpeg-named-png", "really-a-jpeg.png", jpeg_named_png),
    ):
        cases.append(ImageCase(name, filename, data, stored_pixels(data)))
    cases.append(ImageCase("bmp", "plain.bmp", encode(Image.fromarray(photo), "BMP"), photo))
    return cases
