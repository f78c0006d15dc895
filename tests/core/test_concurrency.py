"""Writers of one output as real concurrent processes (one in its own PID namespace), the output lock,
durability (fsync order) and OUT_DIR spellings (symlink, `.`, mount point)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fp8kit.core import CheckpointError, QuantConfig, load_quantized, quantize, save_quantized
from fp8kit.core.files import output_lock

from cli_tools import ENV, REPO, assert_clean_failure, run_cli
from tiny_models import make_tiny_llama, make_tiny_tokenizer

# A writer process: quantizes the tiny Llama of `seed`, waits for the start signal (a file), then saves;
# with `hold` > 0 it stays inside the write (shards written, before the swap) for that many seconds.
WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import fp8kit.core.checkpoint.save as save_module
    from fp8kit.core import CheckpointError, QuantConfig, quantize, save_quantized
    from tiny_models import make_tiny_llama

    out, seed, overwrite, hold, go = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4]), Path(sys.argv[5])
    real = save_module.write_shards

    def slow(tensors, directory, max_bytes):
        real(tensors, directory, max_bytes)
        print("inside", directory, flush=True)
        time.sleep(hold)

    save_module.write_shards = slow
    model = quantize(make_tiny_llama(seed=seed), QuantConfig())
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    try:
        save_quantized(model, out, overwrite=overwrite)
    except CheckpointError as exc:
        print("refused:", exc, flush=True)
        sys.exit(2)
    print("saved", flush=True)
""")


def start_worker(tmp: Path, out: Path, seed: int, overwrite: bool, hold: float, prefix: list[str] | None = None,
                 go: str = "go"):
    """A writer process; it saves once the file `tmp / go` exists."""
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**ENV, "PYTHONPATH": ENV["PYTHONPATH"] + os.pathsep + str(REPO / "tests")}
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, str(script), str(out), str(seed), str(int(overwrite)), str(hold), str(tmp / go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    return proc


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode} before {prefix!r}: {proc.stderr.read()[-3000:]}")
    raise AssertionError(f"no {prefix!r} within {timeout} s")


def assert_output_is_complete_from(out: Path, seed: int) -> None:
    stored = load_file(out / "model.safetensors")
    reference = quantize(make_tiny_llama(seed=seed), QuantConfig())
    for key in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight_scale"):
        want = reference.state_dict()[key]
        assert torch.equal(stored[key].view(torch.uint8), want.view(torch.uint8)) if want.dtype == torch.float8_e4m3fn \
            else torch.equal(stored[key], want.reshape(stored[key].shape)), key
    load_quantized(out)  # complete: every tensor the model needs


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("existing", [False, True])
def test_two_concurrent_writers_one_wins_whole(tmp_path, overwrite, existing):
    """Started at the same instant; each stays 3 s inside its write, so the two writes overlap:
    exactly one reports success, the other is refused, and OUT_DIR is the winner's complete output."""
    out = tmp_path / "out"
    if existing:
        save_quantized(quantize(make_tiny_llama(seed=5), QuantConfig()), out)
    procs = {seed: start_worker(tmp_path, out, seed, overwrite, 3.0) for seed in (1, 2)}
    for proc in procs.values():
        wait_line(proc, "ready")
    (tmp_path / "go").touch()
    results = {seed: (proc.wait(timeout=240), proc.stdout.read()) for seed, proc in procs.items()}
    winners = [seed for seed, (rc, _) in results.items() if rc == 0]
    if existing and not overwrite:
        assert winners == [], results  # both refused: the old output stays
        assert all("not empty" in text or "another process is writing" in text for _, text in results.values())
        assert_output_is_complete_from(out, 5)
    else:
        assert len(winners) == 1, results
        (loser,) = set(results) - set(winners)
        assert results[loser][0] == 2 and "another process is writing it now" in results[loser][1], results[loser]
        assert_output_is_complete_from(out, winners[0])
    assert leftovers(tmp_path, "out") == []  # no lock file, no temporary


def test_a_writer_in_its_own_pid_namespace_is_kept_apart(tmp_path):
    """Process ids mean nothing across PID namespaces (containers); the lock still does. The writer in
    the namespace keeps its temporary while it lives, and finishes with a complete output."""
    probe = subprocess.run(["unshare", "--user", "--pid", "--fork", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine does not allow unprivileged PID namespaces (unshare: {probe.stderr.decode().strip()})")
    out = tmp_path / "out"
    inside = start_worker(tmp_path, out, 1, True, 8.0, prefix=["unshare", "--user", "--pid", "--fork", "--map-root-user"])
    outside = start_worker(tmp_path, out, 2, True, 0.0, go="go-outside")
    wait_line(inside, "ready")
    wait_line(outside, "ready")
    (tmp_path / "go").touch()
    temp = Path(wait_line(inside, "inside").split(" ", 1)[1])
    assert temp.is_dir()
    (tmp_path / "go-outside").touch()  # while the namespaced writer sits inside its write
    assert "another process is writing it now" in wait_line(outside, "refused")
    assert temp.is_dir() and any(temp.iterdir())  # the live writer's temporary was not touched
    assert outside.wait(timeout=240) == 2
    assert inside.wait(timeout=240) == 0, inside.stderr.read()[-3000:]
    assert_output_is_complete_from(out, 1)
    assert leftovers(tmp_path, "out") == []


def test_cli_second_writer_is_refused_while_the_lock_is_held(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):  # as a writer in another process, container or NFS client would hold it
        result = run_cli("core", tiny_llama_dir, out, "--overwrite")
        assert_clean_failure(result, r"out: another process is writing it now \(it holds .*\.out\.lock\)")
        assert not out.exists()
    assert leftovers(tmp_path, "out") == []
    assert run_cli("core", tiny_llama_dir, out).returncode == 0
    load_quantized(out)


def test_files_and_directories_are_fsynced_before_and_after_the_swap(tmp_path, monkeypatch):
    import fp8kit.core.checkpoint.writer as writer
    import fp8kit.core.files as files

    events: list[tuple[str, str]] = []
    real_fsync, real_exchange, real_rename = os.fsync, writer.exchange_paths, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def exchange(a, b):
        events.append(("swap", str(a)))
        return real_exchange(a, b)

    def rename(a, b, *args, **kwargs):
        events.append(("swap", str(a)))
        return real_rename(a, b, *args, **kwargs)

    out = tmp_path / "out"
    save_quantized(quantize(make_tiny_llama(), QuantConfig()), out)
    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(writer, "exchange_paths", exchange)
    monkeypatch.setattr(writer.os, "rename", rename)
    save_quantized(quantize(make_tiny_llama(seed=1), QuantConfig()), out, make_tiny_tokenizer(), overwrite=True)
    (swap,) = [i for i, e in enumerate(events) if e[0] == "swap"]
    temp = events[swap][1]
    before = {e[1] for e in events[:swap] if e[0] == "fsync"}
    assert {os.path.join(temp, name) for name in os.listdir(out)} | {temp} <= before
    assert ("fsync", str(tmp_path)) in events[swap + 1 :]  # the rename itself is on disk


def test_symlinked_out_dir_is_written_through(tmp_path):
    real = tmp_path / "disk" / "real"
    save_quantized(quantize(make_tiny_llama(seed=5), QuantConfig()), real)
    link = tmp_path / "link"
    link.symlink_to(real)
    model = quantize(make_tiny_llama(seed=1), QuantConfig())
    with pytest.raises(CheckpointError, match=rf"{link}: directory exists and is not empty"):
        save_quantized(model, link)
    save_quantized(model, link, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert_output_is_complete_from(real, 1)
    assert leftovers(tmp_path, "link") == [] and leftovers(real.parent, "real") == []


def test_current_directory_and_mount_points_are_refused(tmp_path, monkeypatch):
    model = quantize(make_tiny_llama(), QuantConfig())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for spelling in (".", str(work), "..", "../work/."):
        with pytest.raises(CheckpointError, match=r"is the current directory.*give it a name of its own"):
            save_quantized(model, spelling, overwrite=True)
    mount = next((m for m in ("/proc", "/sys", "/dev") if os.path.ismount(m)), None)
    if mount is not None:
        with pytest.raises(CheckpointError, match=rf"{mount}: is a mount point, which cannot be replaced atomically"):
            save_quantized(model, mount, overwrite=True)
    assert list(work.iterdir()) == [] and list(tmp_path.iterdir()) == [work]


def test_cli_dot_out_dir_is_refused(tiny_llama_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    result = run_cli("core", tiny_llama_dir, ".", "--overwrite", cwd=work)
    assert_clean_failure(result, r"OUT_DIR \.: is the current directory; fp8kit replaces the output as a whole")
    assert [p.name for p in work.iterdir()] == ["keep.txt"] and (work / "keep.txt").read_text() == "mine"


def test_old_output_moved_aside_by_a_killed_writer_is_restored(tmp_path):
    """The two-rename fallback (no RENAME_EXCHANGE) moves OUT_DIR aside first: a writer killed between
    its two renames leaves no OUT_DIR; the next writer, under the lock, puts the old output back."""
    out = tmp_path / "out"
    save_quantized(quantize(make_tiny_llama(seed=5), QuantConfig()), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.rename(tmp_path / ".out.old-0123456789abcdef")
    (tmp_path / ".out.tmp-fedcba9876543210").mkdir()  # its half-published successor
    with pytest.raises(CheckpointError, match="directory exists and is not empty"):
        save_quantized(quantize(make_tiny_llama(seed=1), QuantConfig()), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, "out") == []


def test_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    import fp8kit.core.checkpoint.writer as writer

    out = tmp_path / "out"
    save_quantized(quantize(make_tiny_llama(seed=5), QuantConfig()), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename
    calls = []

    def rename(a, b, *args, **kwargs):
        calls.append(a)
        if len(calls) == 2:  # tmp -> out: the disk fails
            raise OSError(28, "No space left on device")
        return real_rename(a, b, *args, **kwargs)

    monkeypatch.setattr(writer, "exchange_paths", lambda a, b: False)
    monkeypatch.setattr(writer.os, "rename", rename)
    with pytest.raises(CheckpointError, match="cannot move the finished output into place: .*No space left"):
        save_quantized(quantize(make_tiny_llama(seed=1), QuantConfig()), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, "out") == []


# --------------------------------------------------------------------------- export


def test_export_leaves_nothing_behind_and_overwrites_through_symlinks(tmp_path):
    model = tmp_path / "m"
    make_tiny_llama().save_pretrained(model)
    make_tiny_tokenizer().save_pretrained(model)
    real, link = tmp_path / "real.onnx", tmp_path / "out.onnx"
    link.symlink_to(tmp_path / "gone.onnx")  # dangling: still an existing name
    assert_clean_failure(run_cli("export", model, link), r"output .*out\.onnx already exists: pass overwrite=True")
    link.unlink()
    real.write_bytes(b"an old export")
    link.symlink_to(real)
    # What a killed export left: its temporary directory and its (now unlocked) lock file.
    stale = tmp_path / ".real.onnx.tmp-0123456789abcdef"
    stale.mkdir()
    (stale / "real.onnx").write_bytes(b"half")
    (tmp_path / ".real.onnx.lock").touch()
    with output_lock(real):
        assert_clean_failure(run_cli("export", model, link, "--overwrite"), r"another process is writing it now")
    assert stale.is_dir() and real.read_bytes() == b"an old export"
    (tmp_path / ".real.onnx.lock").touch()  # the killed export's lock file, unlocked
    result = run_cli("export", model, link, "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    import onnx

    onnx.checker.check_model(onnx.load(str(real)))
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out.onnx", "real.onnx"]
