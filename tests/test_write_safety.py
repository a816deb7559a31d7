"""Writing survives being killed, runs beside other writers, and fails in one clear line.

`onnxq.model_io.save_model_atomic` and `write_text_atomic` write into unique temporary files (or
one temporary folder for a model with external data) beside the target, fsync them, then rename
them into place. Killed children (SIGKILL) and concurrent children are real processes writing
real models; a full disk and a read-only folder are simulated by making the OS call fail
(running as root, chmod cannot make a folder read-only).
"""

import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq import model_io
from onnxq.errors import OnnxqError

LAYOUTS = {"one file": False, "external data": True}

# A child that writes a model y = x @ W (W: rows x cols, seeded) to OUT with save_model_atomic.
# It waits for GO to exist when given one, so that two children write at the same moment; with
# HOLD it never gets past the first fsync, so a kill is sure to land before the rename.
WRITER = """
import os, sys, time
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnxq import model_io

out, rows, cols, seed, external, go, hold = sys.argv[1:]
rng = np.random.default_rng(int(seed))
weight = numpy_helper.from_array(rng.standard_normal((int(rows), int(cols)), dtype=np.float32), "w")
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", int(rows)])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", int(cols)])], [weight])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
if hold == "1":
    os.fsync = lambda fd: time.sleep(600)
print("ready", flush=True)
while go and not os.path.exists(go):
    time.sleep(0.001)
model_io.save_model_atomic(model, out, external_data=external == "1")
"""


def matmul_model(rows: int, cols: int, seed: int) -> onnx.ModelProto:
    """y = x @ W with a seeded normal W, the model the WRITER child builds."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((rows, cols), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", cols])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def writer(out, rows, cols, seed, external, go="", hold=False) -> subprocess.Popen:
    args = [out, rows, cols, seed, int(external), go, int(hold)]
    return subprocess.Popen([sys.executable, "-c", WRITER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def snapshot(folder) -> dict[str, bytes]:
    """The bytes of every output file in `folder` (temporary entries start with a dot)."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if not path.name.startswith(".")}


def temp_entries(folder, name: str) -> list[str]:
    """Entries that look like a temporary file or folder of the output `name`."""
    pattern = re.compile(rf"^\.{re.escape(name)}\..+\.tmp$")
    return [path.name for path in folder.iterdir() if pattern.match(path.name)]


def run_model(path, rows: int) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((2, rows), np.float32)})[0]


def expected_output(rows: int, cols: int, seed: int) -> np.ndarray:
    weight = np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)
    return np.ones((2, rows), np.float32) @ weight


def temp_bytes(folder, name: str) -> int:
    """Bytes written so far into the temporary entries of the output `name`."""
    total = 0
    for entry in temp_entries(folder, name):
        path = folder / entry
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        total += sum(f.stat().st_size for f in files if f.exists())
    return total


def wait_for_bytes(folder, name: str, child: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the writer has put some bytes in a temporary entry (it then writes for a while)."""
    deadline = time.monotonic() + timeout
    while not temp_bytes(folder, name):
        assert child.poll() is None, f"the writer ended before it wrote: {child.communicate()[1]}"
        assert time.monotonic() < deadline, "the writer wrote no temporary file"
        time.sleep(0.0005)


@pytest.mark.parametrize("external", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_writer_killed_mid_write_leaves_the_earlier_output_intact(tmp_path, external):
    out = tmp_path / "model.onnx"
    model_io.save_model_atomic(matmul_model(64, 32, seed=1), out, external_data=external)
    before = snapshot(tmp_path)
    child = writer(out, 2048, 8192, seed=2, external=external, hold=True)  # 64 MB of weights
    try:
        wait_for_bytes(tmp_path, out.name, child)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    leftovers = temp_entries(tmp_path, out.name)
    assert len(leftovers) <= 1, leftovers
    assert snapshot(tmp_path) == before  # the earlier model (and data file) byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, *leftovers])
    np.testing.assert_allclose(run_model(out, 64), expected_output(64, 32, seed=1), rtol=1e-5)


@pytest.mark.parametrize("external", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_two_writers_into_one_folder_at_once_both_succeed(tmp_path, external):
    folder, go = tmp_path / "out", tmp_path / "go"
    folder.mkdir()
    shapes = {"a.onnx": (512, 1024, 11), "b.onnx": (1024, 512, 12)}
    children = {name: writer(folder / name, *shape, external=external, go=go)
                for name, shape in shapes.items()}
    for child in children.values():  # both built their model and wait for the signal
        assert child.stdout.readline() == "ready\n", child.communicate()[1]
    go.touch()
    for child in children.values():
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr
    expected = {name for name in shapes} | ({f"{name}.data" for name in shapes} if external else set())
    assert {p.name for p in folder.iterdir()} == expected  # no temporary files left
    for name, (rows, cols, seed) in shapes.items():
        np.testing.assert_allclose(run_model(folder / name, rows), expected_output(rows, cols, seed),
                                   rtol=1e-4, atol=1e-3)


def test_external_data_uses_unique_temporary_names_and_the_final_location(tmp_path, monkeypatch):
    model = matmul_model(64, 32, seed=3)
    before = model.SerializeToString()
    renamed = []
    replace = os.replace

    def spy(source, target):  # renames into the output folder (onnx-ir renames inside the temp folder too)
        if os.path.dirname(os.path.relpath(target, tmp_path)) == "":
            renamed.append((os.path.relpath(source, tmp_path), os.path.relpath(target, tmp_path)))
        replace(source, target)

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)  # the 8 KB model counts as big
    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "m.onnx"
    for _ in range(2):
        model_io.save_model_atomic(model, out)
    assert [target for _, target in renamed] == ["m.onnx.data", "m.onnx"] * 2
    folders = {os.path.dirname(source) for source, _ in renamed}
    assert len(folders) == 2 and all(re.fullmatch(r"\.m\.onnx\..+\.tmp", f) for f in folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    written = onnx.load(str(out), load_external_data=False)
    weight = written.graph.initializer[0]
    assert weight.data_location == TensorProto.EXTERNAL
    assert {e.value for e in weight.external_data if e.key == "location"} == {"m.onnx.data"}
    assert model.SerializeToString() == before  # the caller's model is left as it was
    onnx.checker.check_model(str(out))
    np.testing.assert_allclose(run_model(out, 64), expected_output(64, 32, seed=3), rtol=1e-5)


@pytest.mark.parametrize("external", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_files_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch, external):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the file an fd belongs to")
    events = []
    fsync, replace = os.fsync, os.replace

    def fsync_spy(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def replace_spy(source, target):
        if os.path.dirname(os.path.realpath(target)) == os.path.realpath(tmp_path):  # into place
            events.append(("replace", os.path.realpath(source)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync_spy)
    monkeypatch.setattr(os, "replace", replace_spy)
    model_io.save_model_atomic(matmul_model(64, 32, seed=4), tmp_path / "m.onnx", external_data=external)
    renames = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert len(renames) == (2 if external else 1)
    for i in renames:
        assert ("fsync", events[i][1]) in events[:renames[0]]  # every file is on disk before any rename
    assert events[-1] == ("fsync", os.path.realpath(tmp_path))  # then the folder


FAILURES = {"full disk at fsync": ("fsync", errno.ENOSPC, "No space left on device"),
            "full disk at rename": ("replace", errno.ENOSPC, "No space left on device"),
            "read-only folder": ("mkstemp", errno.EROFS, "Read-only file system"),
            "no permission": ("mkstemp", errno.EACCES, "Permission denied")}


def _fail_with(monkeypatch, call: str, code: int) -> None:
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if call == "mkstemp":  # creating the temporary file or folder is the first write in the folder
        monkeypatch.setattr(tempfile, "mkstemp", failing)
        monkeypatch.setattr(tempfile, "mkdtemp", failing)
    else:
        monkeypatch.setattr(os, call, failing)


@pytest.mark.parametrize("external", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("call, code, reason", FAILURES.values(), ids=FAILURES.keys())
def test_a_failed_write_is_one_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch, external,
                                                                     call, code, reason):
    out = tmp_path / "m.onnx"
    model_io.save_model_atomic(matmul_model(64, 32, seed=5), out, external_data=external)
    before = snapshot(tmp_path)
    _fail_with(monkeypatch, call, code)
    with pytest.raises(OnnxqError) as error:
        model_io.save_model_atomic(matmul_model(64, 32, seed=6), out, external_data=external)
    assert str(error.value) == f"cannot write {out}: {reason}"
    with pytest.raises(OnnxqError, match=f"^cannot write {re.escape(str(tmp_path))}/card.json: {reason}$"):
        model_io.write_text_atomic(tmp_path / "card.json", "{}\n")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before and not temp_entries(tmp_path, out.name)


def test_a_read_only_folder_is_one_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        with pytest.raises(OnnxqError, match="^cannot write .*m.onnx: Permission denied$"):
            model_io.save_model_atomic(matmul_model(8, 4, seed=7), folder / "m.onnx")
        assert not list(folder.iterdir())
    finally:
        folder.chmod(0o755)


CLI_WITH_FULL_DISK = """
import errno, os, sys
replace = os.replace
def full_disk(source, target):
    if str(target).endswith(".onnx"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    replace(source, target)
os.replace = full_disk
from onnxq.cli.main import main
main(sys.argv[1:], prog_name="onnxq")
"""


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path):
    model_path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(matmul_model(16, 8, seed=8), str(model_path))
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 16), dtype=np.float32))
    out = tmp_path / "out" / "q.onnx"
    run = subprocess.run([sys.executable, "-c", CLI_WITH_FULL_DISK, "quantize", str(model_path), str(out),
                          "--calib", str(calib)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [f"onnxq: error: cannot write {out}: No space left on device"]
    assert not out.exists() and not list(out.parent.iterdir())
