"""CPU tests of the --nsys helpers: scripts/nsys_import.py (a .qdstrm left by a stripped nsys becomes a
.nsys-rep, or one line names what is missing) and scripts/nsys_summary.py (capture/replay overlap and
device-wide synchronizes, on a small SQLite file with the tables and columns of Nsight Systems' export)."""
import importlib.util
import os
import sqlite3
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


imp = _load("nsys_import")
summ = _load("nsys_summary")


# ---- nsys_import

def _install(tmp_path, importer_body: str) -> Path:
    """An nsys layout as on the CUDA image: host/target-linux-x64/nsys and a sibling folder with the importer."""
    target = tmp_path / "host" / "target-linux-x64"
    desk = tmp_path / "host" / "linux-desktop-glibc_2_11_3-x64"
    target.mkdir(parents=True)
    desk.mkdir(parents=True)
    (target / "nsys").write_text("#!/bin/sh\n")
    imp_path = desk / "QdstrmImporter"
    imp_path.write_text("#!/bin/sh\n" + importer_body)
    for p in (target / "nsys", imp_path):
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return target / "nsys"


def _no_ldd(cmd, **kw):
    if cmd[0] == "ldd":
        raise FileNotFoundError("ldd")
    import subprocess
    return subprocess.run(cmd, **kw)


def test_report_already_there(tmp_path):
    (tmp_path / "r.nsys-rep").write_text("x")
    ok, line = imp.import_report("/nowhere/nsys", str(tmp_path / "r"))
    assert ok and line == f"nsys report: {tmp_path / 'r.nsys-rep'}"


def test_qdstrm_is_imported_with_the_sibling_importer(tmp_path):
    nsys = _install(tmp_path, 'case "$2" in *.qdstrm) echo rep > "${2%.qdstrm}.nsys-rep";; esac\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.qdstrm").write_text("raw")
    ok, line = imp.import_report(str(nsys), str(out / "r"), run=_no_ldd)
    assert ok and (out / "r.nsys-rep").exists() and not (out / "r.qdstrm").exists()


def test_importer_that_cannot_start_names_the_library(tmp_path):
    nsys = _install(tmp_path, 'echo "QdstrmImporter: error while loading shared libraries: libdw.so.1: '
                              'cannot open shared object file: No such file or directory" >&2; exit 127\n')
    (tmp_path / "r.qdstrm").write_text("raw")
    ok, line = imp.import_report(str(nsys), str(tmp_path / "r"), run=_no_ldd)
    assert not ok and "\n" not in line
    assert line.startswith("--nsys: QdstrmImporter failed, missing libdw.so.1 (")
    assert "CASE4_NSYS_LIBS" in line and line.endswith(f"the raw capture is kept: {tmp_path / 'r.qdstrm'}")


def test_missing_libraries_from_ldd():
    text = ("\tlinux-vdso.so.1 (0x00007ffd)\n\tlibdw.so.1 => not found\n\tlibelf.so.1 => not found\n"
            "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n")
    assert imp.missing_libraries(text) == ["libdw.so.1", "libelf.so.1"]


def test_libs_folder_goes_first_on_the_library_path():
    env = imp.importer_env({"CASE4_NSYS_LIBS": "/opt/libs", "LD_LIBRARY_PATH": "/usr/lib"})
    assert env["LD_LIBRARY_PATH"] == f"/opt/libs{os.pathsep}/usr/lib"


def test_no_importer_and_no_capture(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (tmp_path / "r.qdstrm").write_text("raw")
    ok, line = imp.import_report(str(target / "nsys"), str(tmp_path / "r"))
    assert not ok and line.startswith("--nsys: no QdstrmImporter beside")
    ok, line = imp.import_report(str(target / "nsys"), str(tmp_path / "nothing"))
    assert not ok and "nsys wrote neither nothing.nsys-rep nor nothing.qdstrm" in line


# ---- nsys_summary

MAIN, BG = 100, 101  # globalTid of the server's main thread and of the capture thread


def _db(path: Path, captures, replays, kernels, calls) -> Path:
    """captures / replays: (start, end, tid) NVTX push/pop ranges; kernels: (start, end, stream, corr);
    calls: (start, end, tid, corr, name) runtime API calls."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE ThreadNames (nameId INT NOT NULL, priority INT, globalTid INT);
        CREATE TABLE NVTX_EVENTS (start INT NOT NULL, end INT, eventType INT NOT NULL, rangeId INT, category INT,
            color INT, text TEXT, globalTid INT, endGlobalTid INT, textId INT, domainId INT, uint64Value INT,
            int64Value INT, doubleValue REAL, uint32Value INT, int32Value INT, floatValue REAL, jsonTextId INT,
            jsonText TEXT);
        CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INT NOT NULL, end INT NOT NULL, deviceId INT NOT NULL,
            contextId INT NOT NULL, streamId INT NOT NULL, correlationId INT, globalPid INT, demangledName INT NOT NULL,
            shortName INT NOT NULL, graphNodeId INT);
        CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INT NOT NULL, end INT NOT NULL, eventClass INT NOT NULL,
            globalTid INT, correlationId INT, nameId INT NOT NULL, returnValue INT NOT NULL, callchainId INT);
    """)
    names = {}

    def sid(v):
        if v not in names:
            names[v] = len(names) + 1
            db.execute("INSERT INTO StringIds VALUES (?, ?)", (names[v], v))
        return names[v]
    for s, e, t in captures:  # a registered string: text NULL, textId set
        db.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, globalTid, textId) VALUES (?, ?, 59, ?, ?)",
                   (s, e, t, sid("case4 capture")))
    for s, e, t in replays:  # a plain message: text set
        db.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, globalTid, text) VALUES (?, ?, 59, ?, ?)",
                   (s, e, t, "case4 replay"))
    for s, e, st, c in kernels:
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, 0, 1, ?, ?, 1, ?, ?, 1)",
                   (s, e, st, c, sid("gemv"), sid("gemv")))
    for s, e, t, c, n in calls:
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, 0, ?, ?, ?, 0, 0)", (s, e, t, c, sid(n)))
    db.execute("INSERT INTO ThreadNames VALUES (?, 0, ?)", (sid("case4-capture"), BG))
    db.commit()
    db.close()
    return path


def _run(tmp_path, sync_at=None):
    # two replays on the main thread (graph launches 1 and 2 -> kernels on stream 7);
    # a prefill graph launch (3) outside any replay range -> its kernel is not the replay stream's
    replays = [(1000, 1010, MAIN), (2000, 2010, MAIN)]
    calls = [(1002, 1005, MAIN, 1, "cudaGraphLaunch_v10000"), (2002, 2005, MAIN, 2, "cudaGraphLaunch_v10000"),
             (500, 505, MAIN, 3, "cudaGraphLaunch_v10000")]
    kernels = [(1100, 1400, 7, 1), (1450, 1600, 7, 1), (2100, 2300, 7, 2), (510, 900, 9, 3)]
    captures = [(1200, 1300, BG),  # inside kernel 1100-1400: overlaps
                (1410, 1440, BG),  # in the gap between two kernels: no overlap
                (1700, 1800, BG),  # after the first step's kernels: no overlap
                (2250, 2500, BG),  # starts inside 2100-2300: overlaps
                (600, 700, BG),    # during the prefill graph's kernel only: not the replay stream
                (3000, 3100, MAIN)]  # a dynamic-graph capture on another thread
    if sync_at is not None:
        calls.append((sync_at, sync_at + 5, MAIN, 9, "cudaDeviceSynchronize_v3020"))
    return _db(tmp_path / "r.sqlite", captures, replays, kernels, calls)


def test_summary_counts_captures_overlapping_the_replay_stream(tmp_path):
    s = summ.summarize(_run(tmp_path))
    assert s["capture_thread"] == BG and s["captures"] == 5 and s["captures_other_threads"] == 1
    assert s["captures_overlapping_replay"] == 2
    assert s["replay_streams"] == [7] and s["replay_kernels"] == 3
    assert s["device_syncs_in_decode"] == 0 and s["decode_ns"] == 1010
    lines = summ.report(s)
    assert lines[0] == f"capture thread {BG}: 2 of 5 capture ranges overlapped kernels of the replay stream [7] (3 graph kernels)"
    assert lines[1] == "decode: 2 replay ranges over 0.0 ms; no device-wide synchronize ran during decode"


@pytest.mark.parametrize("at, inside", [(1500, True), (100, False), (2600, False)])
def test_summary_finds_a_device_synchronize_only_during_decode(tmp_path, at, inside, capsys):
    path = _run(tmp_path, sync_at=at)
    s = summ.summarize(path)
    assert s["device_syncs_in_decode"] == (1 if inside else 0)
    assert summ.main([str(path)]) == (1 if inside else 0)
    out = capsys.readouterr().out
    assert ("1 device-wide synchronize calls ran during decode" in out) == inside


def test_summary_of_a_report_without_nvtx_says_so(tmp_path, capsys):
    db = sqlite3.connect(tmp_path / "x.sqlite")
    db.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL)")
    db.commit()
    db.close()
    assert summ.main([str(tmp_path / "x.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nsys_summary: ") and "NVTX_EVENTS" in err and "\n" not in err
